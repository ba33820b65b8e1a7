"""LoRA files (kohya ``lora_unet_…``/``lora_te_…``, diffusers and PEFT ``…lora_A``/``lora_B``): plain LoRA modules as
low-rank factors, every other module type of a kohya/LyCORIS file (LoHa, LoKr, (IA)³, DoRA, full diffs…) as its raw
parts, for the host to form ``ΔW`` with its own maths."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConceptError
from ..kv import Key, LowRank
from .files import flatten, load_tensors
from .names import attn2_projection, text_module

_PART = re.compile(
    r"^(?P<base>.+?)\.(?:(?P<down>lora_down|lora_A(?:\.default)?|lora\.down|down)|(?P<up>lora_up|lora_B(?:\.default)?|lora\.up|up))"
    r"\.weight$|^(?P<abase>.+?)\.alpha$"
)
_KOHYA = re.compile(r"^(lora_unet|lora_te[12]?)_[^.]+\.")  # one module name without dots, then the part's name
_PLAIN = {"lora_down.weight", "lora_up.weight", "alpha"}  # kohya parts of a plain LoRA module
_TEXT = re.compile(r"^(lora_te1?_|text_encoder\.|te\.)")
_TEXT_2 = re.compile(r"^(lora_te2_|text_encoder_2\.)")
_UNET = re.compile(r"^(lora_unet_|unet\.|model\.diffusion_model\.)|(down|up|mid)_blocks?|(input|output|middle)_block")

Parts = dict[str, torch.Tensor]
"""A module's tensors by the name of the part in the file (``hada_w1_a``, ``lokr_w2``, ``dora_scale``, ``alpha``…)."""


@dataclass
class LoraFactors:
    """A LoRA's modules at multiplier 1, by where they act: cross-attention K/V, text encoder (SDXL: CLIP-L), SDXL's
    second text encoder (OpenCLIP-G, by its transformers name), and how many other UNet modules.

    Plain LoRA modules are low-rank factors; a module of another type keeps its raw parts (``*_parts``)."""

    name: str
    kv: dict[Key, LowRank] = field(default_factory=dict)
    text: dict[str, LowRank] = field(default_factory=dict)
    text_2: dict[str, LowRank] = field(default_factory=dict)
    kv_parts: dict[Key, Parts] = field(default_factory=dict)
    text_parts: dict[str, Parts] = field(default_factory=dict)
    text_2_parts: dict[str, Parts] = field(default_factory=dict)
    other_unet_modules: int = 0

    @property
    def module_count(self) -> int:
        groups: tuple[dict, ...] = (self.kv, self.text, self.text_2, self.kv_parts, self.text_parts, self.text_2_parts)
        return sum(len(group) for group in groups)


def _modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, Parts]:
    """The file's tensors grouped by module: kohya names split at their first dot (any part name), other schemes
    by the plain LoRA part names they use."""
    modules: dict[str, Parts] = {}
    for key, value in flatten(tensors).items():
        if not isinstance(value, torch.Tensor):
            continue
        if _KOHYA.match(key):
            base, _, part = key.partition(".")
        elif match := _PART.match(key):
            base = match.group("base") or match.group("abase")
            part = "lora_down.weight" if match.group("down") else "lora_up.weight" if match.group("up") else "alpha"
        else:
            continue
        modules.setdefault(base, {})[part] = value
    return modules


def _low_rank(parts: Parts) -> LowRank:
    down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    return LowRank(down.reshape(rank, -1), up.reshape(up.shape[0], rank), alpha / rank)


def parse_lora(name: str, tensors: Mapping[str, torch.Tensor]) -> LoraFactors:
    """Group a LoRA state dict by module; ConceptError if it holds no module at all."""
    factors = LoraFactors(name)
    for base, parts in _modules(tensors).items():
        if set(parts) <= {"alpha"}:
            continue
        low_rank: dict[Any, LowRank]
        raw: dict[Any, Parts]
        key: Any
        projection = attn2_projection(base)
        if projection is not None:
            low_rank, raw, key = factors.kv, factors.kv_parts, projection
        elif _TEXT_2.search(base):
            low_rank, raw, key = factors.text_2, factors.text_2_parts, text_module(base)
        elif _TEXT.search(base):
            low_rank, raw, key = factors.text, factors.text_parts, text_module(base)
        else:
            factors.other_unet_modules += bool(_UNET.search(base))
            continue
        if set(parts) <= _PLAIN and {"lora_down.weight", "lora_up.weight"} <= set(parts):
            low_rank[key] = _low_rank(parts)
        else:
            raw[key] = parts
    if not (factors.module_count or factors.other_unet_modules):
        raise ConceptError(f"LoRA '{name}' holds no LoRA factors this extension can read")
    return factors


def load_lora(path: str | Path, name: str | None = None) -> LoraFactors:
    """Read a LoRA file (safetensors, or a torch pickle read by :mod:`.safe_pickle`)."""
    path = Path(path)
    return parse_lora(name or path.stem, load_tensors(path))


def refuse_ia3(tensors: Mapping[str, torch.Tensor], loader: str) -> None:
    """ConceptError when a LoRA file holds (IA)³ modules (kohya's ``on_input`` part), for a host whose ``loader`` does
    not read them."""
    if any(key.endswith(".on_input") for key in tensors):
        raise ConceptError(f"it holds (IA)³ modules, which {loader} does not read (A1111's does)")
