"""LoRA and Custom Diffusion files written by the tests, in every key scheme people use, from known factors."""

from __future__ import annotations

import torch

from alignit.kv_hooks import attn2_modules


def split_layer(layer: str) -> tuple[str, str]:
    """``input_blocks.1.1.transformer_blocks.0.attn2`` → (``input_blocks.1.1``, ``transformer_blocks.0.attn2``)."""
    parts = layer.split(".")
    cut = 2 if parts[0] == "middle_block" else 3
    return ".".join(parts[:cut]), ".".join(parts[cut:])


def diffusers_name(layer: str) -> str:
    """The diffusers name of an ldm attn2 layer, for SD-layout UNets (2 resnets and a resampler per level)."""
    block, tail = split_layer(layer)
    kind, number = block.split(".")[:2]
    if kind == "middle_block":
        return f"mid_block.attentions.0.{tail}"
    n = int(number)
    if kind == "input_blocks":
        return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}.{tail}"
    return f"up_blocks.{n // 3}.attentions.{n % 3}.{tail}"


def random_factors(unet: torch.nn.Module, rank: int = 2, seed: int = 0) -> dict:
    """Known LoRA factors ``(layer, proj) → (down, up, alpha)`` for every attn2 to_k/to_v."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for key, module in attn2_modules(unet).items():
        out, inp = module.weight.shape
        down = torch.randn(rank, inp, generator=generator) * 0.3
        up = torch.randn(out, rank, generator=generator) * 0.3
        factors[key] = (down, up, torch.tensor(rank / 2))
    return factors


def random_text_factors(text_model: torch.nn.Module, rank: int = 2, seed: int = 1) -> dict:
    """Known factors for the text encoder's q/v projections, by dotted module path (without ``text_model.``)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in text_model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            out, inp = module.weight.shape
            down, up = torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator)
            factors[name.removeprefix("text_model.")] = (down * 0.3, up * 0.3, torch.tensor(1.0))
    return factors


def lora_state(factors: dict, text: dict | None = None, scheme: str = "kohya") -> dict[str, torch.Tensor]:
    """A LoRA state dict with ``kohya`` (diffusers names), ``kohya_ldm``, ``peft`` or ``diffusers_old`` keys."""
    state = {}
    for (layer, proj), (down, up, alpha) in factors.items():
        diffusers = f"{diffusers_name(layer)}.to_{proj}"
        if scheme in ("kohya", "kohya_ldm"):
            name = diffusers if scheme == "kohya" else f"{layer}.to_{proj}"
            base = "lora_unet_" + name.replace(".", "_")
            state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
        elif scheme == "peft":
            state |= {f"unet.{diffusers}.lora_A.weight": down, f"unet.{diffusers}.lora_B.weight": up}
        else:
            base = f"{diffusers_name(layer)}.processor.to_{proj}_lora"
            state |= {f"{base}.down.weight": down, f"{base}.up.weight": up}
    for name, (down, up, alpha) in (text or {}).items():
        if scheme == "peft":
            state |= {f"text_encoder.text_model.{name}.lora_A.weight": down, f"text_encoder.text_model.{name}.lora_B.weight": up}
        else:
            base = "lora_te_text_model_" + name.replace(".", "_")
            state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
    return state


def random_cd_weights(unet: torch.nn.Module, seed: int = 2, scale: float = 0.5) -> dict:
    """Fine-tuned to_k/to_v weights ``(layer, proj) → W_cd`` near the UNet's own."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: module.weight.detach() + scale * torch.randn(module.weight.shape, generator=generator)
        for key, module in attn2_modules(unet).items()
    }


def cd_state(weights: dict, modifier: torch.Tensor, scheme: str) -> dict:
    """``delta_bin`` (original repository), ``compvis`` (delta_epoch=N.ckpt) or ``diffusers`` (example script)."""
    if scheme == "compvis":
        state = {f"model.diffusion_model.{layer}.to_{proj}.weight": w for (layer, proj), w in weights.items()}
        return {"state_dict": state | {"embed": modifier}}
    if scheme == "delta_bin":
        named = {f"{diffusers_name(layer)}.to_{proj}.weight": w for (layer, proj), w in weights.items()}
        return {"unet": named, "modifier_token": {"<new1>": modifier[0]}}
    return {f"{diffusers_name(layer)}.processor.to_{proj}_custom_diffusion.weight": w for (layer, proj), w in weights.items()}
