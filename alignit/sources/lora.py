"""LoRA files (kohya ``lora_unet_…``/``lora_te_…``, diffusers and PEFT ``…lora_A``/``lora_B``) as low-rank factors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConceptError
from ..kv import LowRank
from .files import flatten, load_tensors
from .names import attn2_projection, text_module

_PART = re.compile(
    r"^(?P<base>.+?)\.(?:(?P<down>lora_down|lora_A(?:\.default)?|lora\.down|down)|(?P<up>lora_up|lora_B(?:\.default)?|lora\.up|up))"
    r"\.weight$|^(?P<abase>.+?)\.alpha$"
)
_TEXT = re.compile(r"^(lora_te1?_|text_encoder\.|te\.)")
_TEXT_2 = re.compile(r"^(lora_te2_|text_encoder_2\.)")
_UNET = re.compile(r"^(lora_unet_|unet\.|model\.diffusion_model\.)|(down|up|mid)_blocks?|(input|output|middle)_block")


@dataclass
class LoraFactors:
    """A LoRA's low-rank factors at multiplier 1: cross-attention K/V, text encoder (SDXL: CLIP-L), SDXL's second
    text encoder (OpenCLIP-G), and how many other UNet modules."""

    name: str
    kv: dict[tuple[str, str], LowRank] = field(default_factory=dict)
    text: dict[str, LowRank] = field(default_factory=dict)
    text_2: dict[str, LowRank] = field(default_factory=dict)
    other_unet_modules: int = 0


def parse_lora(name: str, tensors: Mapping[str, torch.Tensor]) -> LoraFactors:
    """Group a LoRA state dict by module; ConceptError if it holds no LoRA factors at all."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flatten(tensors).items():
        match = _PART.match(key)
        if match is None or not isinstance(value, torch.Tensor):
            continue
        base = match.group("base") or match.group("abase")
        kind = "down" if match.group("down") else "up" if match.group("up") else "alpha"
        parts.setdefault(base, {})[kind] = value
    factors = LoraFactors(name)
    for base, part in parts.items():
        if "down" not in part or "up" not in part:
            continue
        down, up = part["down"].float(), part["up"].float()
        rank = down.shape[0]
        alpha = float(part["alpha"]) if "alpha" in part else float(rank)
        low_rank = LowRank(down.reshape(rank, -1), up.reshape(up.shape[0], rank), alpha / rank)
        projection = attn2_projection(base)
        if projection is not None:
            factors.kv[projection] = low_rank
        elif _TEXT_2.search(base):
            factors.text_2[text_module(base)] = low_rank
        elif _TEXT.search(base):
            factors.text[text_module(base)] = low_rank
        elif _UNET.search(base):
            factors.other_unet_modules += 1
    if not (factors.kv or factors.text or factors.text_2 or factors.other_unet_modules):
        raise ConceptError(f"LoRA '{name}' holds no LoRA factors this extension can read")
    return factors


def load_lora(path: str | Path, name: str | None = None) -> LoraFactors:
    """Read a LoRA file (safetensors, or a pickle with ``weights_only=True``)."""
    path = Path(path)
    return parse_lora(name or path.stem, load_tensors(path))
