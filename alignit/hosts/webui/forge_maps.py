"""Attention maps on Forge: ``attn2`` patches on a cloned UNet patcher, feeding a ``MapRecorder``.

Like AlignIT's K/V patches (``forge_attention``): an ``attn2_patch`` notes the context each block is about to project;
a replace patch on each recorded cross-attention layer adds the probabilities from the ``q`` and ``k`` it receives,
then calls the replace patch it found in that slot or Forge's ``attention_function``. Installed before AlignIT's K/V
patches, which then wrap these and hand them the rewritten keys. Cond rows: the ``cond_or_uncond`` chunks of the batch
(backend/sampling/sampling_function.py 231-257), each holding every image of the batch in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...attention_maps import LEVELS, CallColumns, MapRecorder, layer_grid
from ...attn2_slots import block_key
from ...kv_hooks import attn2_factors
from .forge_attention import Attention, block_of

log = logging.getLogger("alignit")


class MapPatch:
    """The maps' patches for one sampling pass."""

    def __init__(self, recorder: MapRecorder, attention: Attention, levels: Sequence[int] = LEVELS):
        self.recorder = recorder
        self.attention = attention
        self.levels = levels
        self.active = True
        self.error: str | None = None
        self._seen: tuple[Any, torch.Tensor] | None = None  # (block, context) just observed
        self._matched: tuple[torch.Tensor, int | None, tuple, CallColumns | None] | None = None

    def install(self, unet: Any) -> None:
        """Register the patches on ``unet`` (a clone the caller owns), wrapping replace patches already there."""
        replaced = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        unet.set_model_attn2_patch(self._observer())
        for layer, factor in attn2_factors(unet.model.diffusion_model).items():
            if factor in self.levels:
                name, number, index = block_key(layer)
                inner = replaced.get((name, number, index)) or replaced.get((name, number))
                unet.set_model_attn2_replace(self._replacement(factor, inner), name, number, index)

    def _observer(self) -> Callable:
        def observe(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict) -> tuple:
            if self.active:
                self._seen = (block_of(extra_options), context)
            return n, context, value

        return observe

    def _columns(self, context: torch.Tensor, order: tuple) -> CallColumns | None:
        """The cond rows' columns, once per context object (every layer of one UNet call sees the same one)."""
        version = None if context.is_inference() else context._version
        cached = self._matched
        if cached is not None and cached[0] is context and cached[1] == version and cached[2] == order:
            return cached[3]
        size = context.shape[0] // len(order) if order and context.shape[0] % len(order) == 0 else 0
        rows = [chunk * size + i for chunk, kind in enumerate(order) if kind == 0 for i in range(size)]
        call = self.recorder.match(context, rows, [row % size for row in rows]) if rows else None
        self._matched = (context, version, order, call)
        return call

    def _replacement(self, factor: int, inner: Callable | None) -> Callable:
        def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            seen, self._seen = self._seen, None
            if self.active and seen is not None and seen[0] == block_of(extra_options):
                try:
                    call = self._columns(seen[1], tuple(extra_options.get("cond_or_uncond") or ()))
                    shape = extra_options.get("original_shape")
                    latent = (int(shape[-2]), int(shape[-1])) if shape else (0, 0)
                    grid = layer_grid(latent, factor, q.shape[1])
                    if call is not None and grid is not None:
                        self.recorder.add(call, q, k, extra_options["n_heads"], latent, grid)
                except Exception as error:  # a failure must cost the maps, not the generation
                    log.exception("AlignIT: recording attention maps")
                    self.error = f"{type(error).__name__}: {error}"
                    self.remove()
            if inner is not None:
                return inner(q, k, v, extra_options)
            return self.attention(q, k, v, extra_options["n_heads"])

        return replace

    def remove(self) -> None:
        """Make the patches pass-through (Forge drops the patched clone when it resets ``forge_objects``)."""
        self.active = False
        self._seen = None
        self._matched = None
