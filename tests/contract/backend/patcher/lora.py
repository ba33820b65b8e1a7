"""backend/patcher/lora.py → packages_3rdparty/comfyui_lora_collection/lora.py: ``load_lora(lora, to_load)``
(l.32-212: ``patch_dict[model key] = ("lora", (up, down, alpha, mid, dora_scale))`` or ``("loha", (w1a, w1b, alpha,
w2a, w2b, t1, t2, dora_scale))``, and the keys it did not use), ``model_lora_keys_unet`` (l.286: ``lora_unet_`` +
the ldm path and the bare ``diffusion_model.`` path; the real one also maps diffusers names, which
tests/test_forge_integration.py exercises), ``model_lora_keys_clip`` (l.215-257: kohya ``lora_te_``/``lora_te1_``
names of ``clip_l``, ``lora_te2_`` of ``clip_g``), and ``merge_lora_to_weight`` (backend/patcher/lora.py 97-300:
``W + s·(α/r)·up@down`` for "lora", ``W + s·(α/r)·(w1a@w1b)*(w2a@w2b)`` for "loha")."""

import torch

LORA_CLIP_MAP = {name: name.replace(".", "_") for name in ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj")}
LORA_CLIP_MAP |= {name: name.replace(".", "_") for name in ("self_attn.v_proj", "self_attn.out_proj")}


def load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for x, target in to_load.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.lora_up.weight" in lora:
            names = [f"{x}.lora_up.weight", f"{x}.lora_down.weight"]
            patch_dict[target] = ("lora", (lora[names[0]], lora[names[1]], alpha, None, None))
        elif f"{x}.hada_w1_a" in lora:
            names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
            w1a, w1b, w2a, w2b = (lora[n] for n in names)
            patch_dict[target] = ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, None))
        else:
            continue
        loaded.update(names + [f"{x}.alpha"])
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - the real signature
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k
    return key_map


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 - the real signature
    sdk = model.state_dict().keys()
    for b in range(32):
        for c, lora_name in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_name}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_name}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora_name}"] = k
    return key_map


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight = weight.clone().to(computation_dtype)
    for strength, (kind, v), strength_model, _offset, _function in patches:
        weight *= strength_model
        if kind == "lora":
            diff, rank = v[0].flatten(1) @ v[1].flatten(1), v[1].shape[0]
        else:
            diff, rank = (v[0] @ v[1]) * (v[3] @ v[4]), v[1].shape[0]
        alpha = v[2] / rank if v[2] is not None else 1.0
        weight += strength * alpha * diff.reshape(weight.shape)
    return weight
