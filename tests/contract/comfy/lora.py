"""comfy/lora.py: ``load_lora`` (l.37-94: per key-map entry, the first adapter of ``weight_adapter.adapters`` that
reads it, with its ``.alpha``), ``model_lora_keys_clip`` (l.97-173: ``text_encoders.<key>``, and for each CLIP layer's
``mlp.fc1/fc2``, ``self_attn.q/k/v/out_proj``: kohya ``lora_te_``/``lora_te1_`` and diffusers ``text_encoder.`` names
of ``clip_l``, ``lora_te2_``/``text_encoder_2.`` of ``clip_g``), ``model_lora_keys_unet`` (l.175: ``lora_unet_`` + the
ldm path and the bare ``diffusion_model.`` path; the real one also maps the diffusers names, which
tests/test_comfyui_integration.py exercises) and ``calculate_weight`` (l.369-432: each patch
``(strength, adapter, strength_model, offset, function)`` applied in turn)."""

from __future__ import annotations

import logging

from . import weight_adapter

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def load_lora(lora, to_load, log_missing=True):
    patch_dict, loaded_keys = {}, set()
    for x, target in to_load.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded_keys.add(f"{x}.alpha")
        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, None, loaded_keys)
            if adapter is not None:
                patch_dict[target] = adapter
                loaded_keys.update(adapter.loaded_keys)
    if log_missing:
        for key in lora:
            if key not in loaded_keys:
                logging.warning("lora key not loaded: %s", key)
    return patch_dict


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 - the real signature
    sdk = model.state_dict().keys()
    for k in sdk:
        if k.endswith(".weight"):
            key_map[f"text_encoders.{k[: -len('.weight')]}"] = k
    clip_l_present = False
    for b in range(32):
        for c, name in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{name}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{name}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk and clip_l_present:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{name}"] = k
                key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - the real signature
    for k in model.state_dict():
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
                key_map[k[: -len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map


def calculate_weight(patches, weight, key, intermediate_dtype=None, original_weights=None):
    for strength, adapter, strength_model, _offset, function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        weight = adapter.calculate_weight(weight, key, strength, strength_model, None, function or (lambda a: a))
    return weight
