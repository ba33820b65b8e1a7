"""comfy/sd.py: ``CLIP`` (l.103-307) with ``clone`` (l.165: the same text model and tokenizer, a cloned patcher),
``add_patches`` (l.179), ``clip_layer`` (l.185), ``tokenize`` (l.188 → the tokenizer's ``tokenize_with_weights``),
``encode_from_tokens_scheduled`` (l.201: without clip hooks, one entry ``[cond, {"pooled_output": …}]``),
``encode_from_tokens`` (l.260: clip options reset and the layer set, the patcher loaded, i.e. its LoRA patches merged
into the shared weights, then ``encode_token_weights``) and ``load_model`` (l.302); and ``load_lora_for_models``
(l.72-100). The real constructor builds the text model from a checkpoint; the tests build it with ``no_init``."""

from __future__ import annotations

import logging

from . import lora, lora_convert, model_management, model_patcher


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, **kwargs):  # the real one: l.104
        if not no_init:
            raise NotImplementedError("the contract builds a CLIP with no_init (tests/comfy_flow.py)")

    @classmethod
    def of(cls, cond_stage_model, tokenizer):
        """Test helper: a CLIP around a text model and a tokenizer."""
        clip = cls(no_init=True)
        clip.cond_stage_model = cond_stage_model
        clip.tokenizer = tokenizer
        clip.patcher = model_patcher.ModelPatcher(cond_stage_model)
        clip.layer_idx = None
        clip.tokenizer_options = {}
        return clip

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        n.tokenizer_options = self.tokenizer_options.copy()
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):  # noqa: B006
        pooled_dict = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = pooled_dict.pop("cond")
        pooled_dict.update(add_dict)
        return [[cond, pooled_dict]]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        self.load_model()
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        if return_pooled:
            return cond, pooled
        return cond

    def load_model(self):
        model_management.load_model_gpu(self.patcher)
        return self.patcher


def load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map = lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = lora.load_lora(lora_convert.convert_lora(lora_sd), key_map)
    new_model, new_clip, k, k1 = None, None, set(), set()
    if model is not None:
        new_model = model.clone()
        k = set(new_model.add_patches(loaded, strength_model))
    if clip is not None:
        new_clip = clip.clone()
        k1 = set(new_clip.add_patches(loaded, strength_clip))
    for key in loaded:
        if key not in k and key not in k1:
            logging.warning("NOT LOADED %s", key)
    return new_model, new_clip
