"""Custom Diffusion deltas: the fine-tuned cross-attention K/V weights and the modifier-token embeddings.

Formats read: the original repository's ``delta.bin`` (``{'unet': {…attn2.to_k.weight…}, 'modifier_token':
{'<new1>': vector}}``), its CompVis ``delta_epoch=N.ckpt`` (``state_dict`` with
``model.diffusion_model…attn2.to_k.weight`` and ``embed``, the modifier tokens ``<new1>``, ``<new2>``… in order)
and the diffusers example's ``pytorch_custom_diffusion_weights.bin``/``.safetensors``
(``…attn2.processor.to_k_custom_diffusion.weight``; its modifier tokens come as a separate embedding file).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConceptError
from ..kv import Replacement
from .files import flatten, load_tensors
from .names import attn2_projection

EXTENSIONS = (".bin", ".ckpt", ".pt", ".safetensors")


@dataclass
class CustomDiffusionDelta:
    name: str
    kv: dict[tuple[str, str], Replacement] = field(default_factory=dict)
    modifier_tokens: dict[str, torch.Tensor] = field(default_factory=dict)


def _weights(tensors: Mapping[str, Any]) -> dict[tuple[str, str], Replacement]:
    weights = {}
    for key, value in tensors.items():
        projection = attn2_projection(key)
        if projection is not None and key.endswith("weight") and isinstance(value, torch.Tensor) and value.dim() == 2:
            weights[projection] = Replacement(value.float())
    return weights


def parse_custom_diffusion(name: str, tree: Mapping[str, Any]) -> CustomDiffusionDelta:
    """Read any of the three formats; ConceptError when no cross-attention weights are found."""
    delta = CustomDiffusionDelta(name)
    if isinstance(tree.get("unet"), Mapping):
        delta.kv = _weights(flatten(tree["unet"]))
        for token, vector in (tree.get("modifier_token") or {}).items():
            delta.modifier_tokens[token] = vector.float().reshape(-1, vector.shape[-1])
    elif isinstance(tree.get("state_dict"), Mapping):
        state = tree["state_dict"]
        delta.kv = _weights(state)
        embed = state.get("embed")
        if isinstance(embed, torch.Tensor):
            for i, row in enumerate(embed.float().reshape(-1, embed.shape[-1])):
                delta.modifier_tokens[f"<new{i + 1}>"] = row[None]
    else:
        delta.kv = _weights(flatten(tree))
    if not delta.kv:
        raise ConceptError(f"Custom Diffusion delta '{name}' holds no attn2 to_k/to_v weights")
    return delta


def load_custom_diffusion(path: str | Path) -> CustomDiffusionDelta:
    path = Path(path)
    return parse_custom_diffusion(path.stem, load_tensors(path))
