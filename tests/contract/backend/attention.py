"""backend/attention.py:324 ``attention_pytorch(q, k, v, heads, mask=None)`` (``attention_function`` on a machine
with PyTorch SDPA): q/k/v ``[B, N, heads·dim_head]`` in, ``[B, N, heads·dim_head]`` out."""

import torch


def attention_function(q, k, v, heads, mask=None):
    b, _, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)
