"""backend/patcher/lora.py → packages_3rdparty/comfyui_lora_collection/lora.py: ``load_lora(lora, to_load)``
(l.32-212: ``patch_dict[model key] = ("lora", (up, down, alpha, mid, dora_scale))``, ``("loha", (w1a, w1b, alpha,
w2a, w2b, t1, t2, dora_scale))``, ``("lokr", (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale))`` or
``("diff", (diff,))``, and the keys it did not use), ``model_lora_keys_unet`` (l.286: ``lora_unet_`` + the ldm path and
the bare ``diffusion_model.`` path; the real one also maps diffusers names, which tests/test_forge_integration.py
exercises), ``model_lora_keys_clip`` (l.215-257: kohya ``lora_te_``/``lora_te1_`` names of ``clip_l``, ``lora_te2_``
of ``clip_g``), and ``merge_lora_to_weight`` (backend/patcher/lora.py 85-300) with ``weight_decompose`` (l.52-82,
DoRA) for those types. CP decompositions (``lora_mid``, ``hada_t1``, ``lokr_t2``), GLoRA and offsets are left out."""

import torch

LORA_CLIP_MAP = {name: name.replace(".", "_") for name in ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj")}
LORA_CLIP_MAP |= {name: name.replace(".", "_") for name in ("self_attn.v_proj", "self_attn.out_proj")}
LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for x, target in to_load.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        dora_scale = lora.get(f"{x}.dora_scale")
        loaded.update(name for name in (f"{x}.alpha", f"{x}.dora_scale") if name in lora)
        if f"{x}.lora_up.weight" in lora:
            names = [f"{x}.lora_up.weight", f"{x}.lora_down.weight"]
            patch_dict[target] = ("lora", (lora[names[0]], lora[names[1]], alpha, None, dora_scale))
            loaded.update(names)
        if f"{x}.hada_w1_a" in lora:
            names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
            w1a, w1b, w2a, w2b = (lora[n] for n in names)
            patch_dict[target] = ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, dora_scale))
            loaded.update(names)
        lokr = {name: lora.get(f"{x}.{name}") for name in LOKR}
        if any(lokr[name] is not None for name in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            w1, w2, w1_a, w1_b, w2_a, w2_b, t2 = (lokr[name] for name in LOKR)
            patch_dict[target] = ("lokr", (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale))
            loaded.update(f"{x}.{name}" for name, value in lokr.items() if value is not None)
        if f"{x}.diff" in lora:
            patch_dict[target] = ("diff", (lora[f"{x}.diff"],))
            loaded.add(f"{x}.diff")
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


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function):
    dora_scale = dora_scale.to(weight.device, computation_dtype)
    lora_diff *= alpha
    weight_calc = weight + function(lora_diff).type(weight.dtype)
    if dora_scale.shape[0] == weight_calc.shape[0]:  # on the output axis: the norms of the weight's rows
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], 1)
    else:
        weight_norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
        weight_norm = weight_norm.reshape(weight_calc.shape[1], 1).transpose(0, 1)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def _add(weight, diff, alpha, strength, dora_scale, computation_dtype, function):
    if dora_scale is not None:
        return weight_decompose(dora_scale, weight, diff, alpha, strength, computation_dtype, function)
    weight += function(((strength * alpha) * diff).type(weight.dtype))
    return weight


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight = weight.clone().to(computation_dtype)
    for strength, (kind, v), strength_model, _offset, function in patches:
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        if kind == "diff":
            weight += strength * v[0].to(weight.dtype)
        elif kind == "lora":
            alpha = v[2] / v[1].shape[0] if v[2] is not None else 1.0
            diff = torch.mm(v[0].flatten(start_dim=1), v[1].flatten(start_dim=1)).reshape(weight.shape)
            weight = _add(weight, diff, alpha, strength, v[4], computation_dtype, function)
        elif kind == "lokr":
            w1, w2, dim = v[0], v[1], None
            if w1 is None:
                dim, w1 = v[4].shape[0], torch.mm(v[3], v[4])
            if w2 is None:
                dim, w2 = v[6].shape[0], torch.mm(v[5], v[6])
            alpha = v[2] / dim if v[2] is not None and dim is not None else 1.0
            weight = _add(weight, torch.kron(w1, w2).reshape(weight.shape), alpha, strength, v[8], computation_dtype, function)
        else:
            alpha = v[2] / v[1].shape[0] if v[2] is not None else 1.0
            diff = (torch.mm(v[0], v[1]) * torch.mm(v[3], v[4])).reshape(weight.shape)
            weight = _add(weight, diff, alpha, strength, v[7], computation_dtype, function)
    return weight
