"""The ``attn2`` patch API that ComfyUI has and Forge took from it: which replace-patch slot a cross-attention layer
has, and which rows of a patched call's batch are cond.

A replace patch sits in the slot ``(block, id, block_index)`` (ComfyUI: comfy/ldm/modules/diffusionmodules/
openaimodel.py 872/886/893 and attention.py 1020; Forge: backend/nn/unet.py 236-259). Each call's batch is
``len(cond_or_uncond)`` equal chunks, 0 marking cond (comfy/samplers.py 292-314; Forge:
backend/sampling/sampling_function.py 231-257)."""

from __future__ import annotations

import functools
import re

import torch

from .kv import KVRewriter

_LAYER = re.compile(r"^(?:(input|output)_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.attn2$")


def block_key(layer: str) -> tuple[str, int, int]:
    """The replace-patch slot ``(block name, block id, transformer index)`` of an ldm layer path."""
    match = _LAYER.match(layer)
    if match is None:
        raise ValueError(f"{layer} is not a cross-attention layer of an SD UNet")
    kind, number, index = match.groups()
    return (kind or "middle", int(number or 0), int(index))


def cond_batch_rows(extra_options: dict, batch: int) -> torch.Tensor | None:
    """Batch rows of the cond chunks of a patched call; None when the call does not say."""
    order = extra_options.get("cond_or_uncond")
    return _cond_rows(tuple(order), batch) if order else None


@functools.lru_cache(maxsize=32)
def _cond_rows(order: tuple[int, ...], batch: int) -> torch.Tensor | None:
    if batch % len(order):
        return None
    size = batch // len(order)
    rows = [chunk * size + i for chunk, kind in enumerate(order) if kind == 0 for i in range(size)]
    return torch.tensor(rows, dtype=torch.long)


def block_of(extra_options: dict) -> tuple:
    """Which transformer block a patch call is for, ``(block, transformer index)``: what an ``attn2_patch`` observer
    and the replace patch after it compare to know they see the same block."""
    return (extra_options.get("block"), extra_options.get("block_index"))


Seen = tuple[tuple, torch.Tensor, torch.Tensor]
"""What an ``attn2_patch`` observer noted: the block, and the context and value the block is about to project."""


def rewrite_seen(
    rewriter: KVRewriter, layer: str, seen: Seen | None, extra_options: dict, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The replace patch's k and v with the concept rows rewritten, when the observer saw this very block's context
    (its cond chunks only); k and v as they are otherwise."""
    if seen is None or seen[0] != block_of(extra_options):
        return k, v
    rows = cond_batch_rows(extra_options, k.shape[0])
    return rewriter.rewrite((layer, "k"), seen[1], k, rows), rewriter.rewrite((layer, "v"), seen[2], v, rows)
