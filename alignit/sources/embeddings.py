"""Textual-inversion embedding files: their vectors, per text encoder.

Formats read: A1111's ``.pt`` (``string_to_param: {'*': n x C}``) and ``.safetensors`` (``emb_params``), SDXL
embeddings (``clip_l`` and ``clip_g``, A1111's and diffusers' convention alike) and diffusers' ``learned_embeds``
files (one entry, ``{'<token>': C or n x C}``, as ``sd-concepts-library`` publishes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConceptError

SDXL_KEYS = ("clip_l", "clip_g")
"""The vectors of SDXL's CLIP-L and OpenCLIP-G text encoders, in the order their rows are concatenated."""


@dataclass(frozen=True)
class Embedding:
    """An embedding's vectors: ``vectors[""]`` (n x C) for one text encoder, or ``clip_l`` and ``clip_g`` for SDXL."""

    name: str
    vectors: Mapping[str, torch.Tensor]

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def _matrix(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
        raise ConceptError(f"embedding '{name}' holds no vectors")
    return value.detach().float().reshape(-1, value.shape[-1])


def parse_embedding(name: str, tree: Mapping[str, Any]) -> Embedding:
    """Read any of the formats; ConceptError when the file holds no embedding."""
    if all(isinstance(tree.get(key), torch.Tensor) for key in SDXL_KEYS):
        vectors = {key: _matrix(name, tree[key]) for key in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise ConceptError(f"embedding '{name}': clip_l and clip_g hold different numbers of vectors")
        return Embedding(name, vectors)
    params = tree.get("string_to_param")
    if isinstance(params, Mapping) and params:
        return Embedding(name, {"": _matrix(name, next(iter(params.values())))})
    if "emb_params" in tree:
        return Embedding(name, {"": _matrix(name, tree["emb_params"])})
    tensors = [value for value in tree.values() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        return Embedding(name, {"": _matrix(name, tensors[0])})
    raise ConceptError(
        f"'{name}' is not a textual-inversion embedding (no string_to_param, emb_params, clip_l/clip_g or single vector)"
    )
