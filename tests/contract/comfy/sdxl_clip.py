"""comfy/sdxl_clip.py: ``SDXLClipGTokenizer`` (l.19: pads with 0, embeddings 1280 wide under ``clip_g``),
``SDXLTokenizer`` (l.24: streams ``g`` and ``l`` of the same text) and ``SDXLClipModel`` (l.41-62: CLIP-L and
OpenCLIP-G, each its hidden state -2 without the final LayerNorm, rows concatenated to 2048; the pooled output is G's)."""

from __future__ import annotations

import torch

from . import sd1_clip


class SDXLClipGTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, tokenizer, embedding_directory=None, embedding_size=1280):
        super().__init__(tokenizer, embedding_directory, embedding_size, embedding_key="clip_g", pad_with_end=False)


class SDXLTokenizer:
    """``sizes``: the embedding widths of CLIP-L and OpenCLIP-G (the real ones': 768, 1280; the tests' are smaller)."""

    def __init__(self, tokenizer, embedding_directory=None, sizes=(768, 1280)):
        self.clip_l = sd1_clip.SDTokenizer(tokenizer, embedding_directory, sizes[0])
        self.clip_g = SDXLClipGTokenizer(tokenizer, embedding_directory, sizes[1])

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {
            "g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
            "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
        }


class SDXLClipModel(torch.nn.Module):
    def __init__(self, model_l, model_g):
        super().__init__()
        self.clip_l = sd1_clip.SDClipModel(model_l, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
        special_g = {"start": 49406, "end": 49407, "pad": 0}
        self.clip_g = sd1_clip.SDClipModel(model_g, special_g, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.clip_g.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_g.reset_clip_options()
        self.clip_l.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])
        l_out, _ = self.clip_l.encode_token_weights(token_weight_pairs["l"])
        cut_to = min(l_out.shape[1], g_out.shape[1])
        return torch.cat([l_out[:, :cut_to], g_out[:, :cut_to]], dim=-1), g_pooled
