"""comfy/ldm/modules/attention.py ``optimized_attention(q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)`` (l.719-741, the function ComfyUI picked at start;
``attention_pytorch``, l.483, on machines with PyTorch SDPA): q, k, v ``[B, N, heads·dim_head]`` in,
``[B, N, heads·dim_head]`` out; ``wrap_attn`` (l.125) hands it to ``transformer_options["optimized_attention_override"]``
when one is set. How ``BasicTransformerBlock.forward`` runs ``attn2`` patches is mirrored in tests/comfy_flow.py."""

import torch


def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    override = (kwargs.get("transformer_options") or {}).get("optimized_attention_override")
    if override is not None:
        return override(optimized_attention, q, k, v, heads, mask=mask, attn_precision=attn_precision)
    b, _, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)
