"""Attention maps on A1111: forward hooks on the ldm UNet A1111 runs, feeding a ``MapRecorder``.

Every attention optimization A1111 has (``sd_hijack_optimizations.py``: split, sub-quadratic, xformers, SDP, …) calls
``self.to_q(x)`` and ``self.to_k(context)`` and keeps the probabilities inside its kernel, so the hooks keep what
``to_q`` and ``to_k`` return (``to_k``'s after AlignIT's own K/V hooks, which run first) and a hook on ``attn2``
recomputes the probabilities from them once the layer is done.

Which batch rows are cond rows: the CFG denoiser (``sd_samplers_cfg_denoiser.py`` 197-250 at v1.10.1) stacks the cond
rows of every image and AND part first, image by image, then the uncond rows, and runs the UNet on that stack whole or
in consecutive slices. The ``cfg_denoiser`` callback marks the start of each denoiser call; a pre-hook on the UNet
counts the rows of each call from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from modules import script_callbacks

from ...attention_maps import LEVELS, CallColumns, MapRecorder, layer_grid
from ...kv_hooks import attn2_factors

log = logging.getLogger("alignit")

_live: list[MapHooks] = []
_registered = False


def _on_denoiser(params: Any) -> None:
    for hooks in list(_live):
        hooks.denoiser_call(params)


def _register_callback() -> None:
    global _registered
    if not _registered:
        script_callbacks.on_cfg_denoiser(_on_denoiser)
        _registered = True


def retire() -> None:
    """Remove every map hook left installed (normally none is left between passes)."""
    while _live:
        _live.pop().remove()


class MapHooks:
    """The hooks of one sampling pass; ``cond_items[r]`` is the image of cond row ``r`` of each denoiser call."""

    def __init__(
        self,
        unet: torch.nn.Module,
        recorder: MapRecorder,
        cond_items: Sequence[int],
        is_current: Callable[[], bool] = lambda: True,
        levels: Sequence[int] = LEVELS,
    ):
        self.recorder = recorder
        self.cond_items = list(cond_items)
        self.is_current = is_current
        self.error: str | None = None
        self._offset = 0  # rows of the current denoiser call run so far
        self._rows_known = True  # the denoiser call has the cond rows this pass planned
        self._call: CallColumns | None = None
        self._latent: tuple[int, int] = (0, 0)
        self._kept: dict[str, dict[str, torch.Tensor]] = {}
        modules = dict(unet.named_modules())
        self._handles = [unet.register_forward_pre_hook(self._unet_call, with_kwargs=True)]
        for layer, factor in attn2_factors(unet).items():
            if factor not in levels:
                continue
            attention = modules[layer]
            self._handles += [
                attention.to_q.register_forward_hook(self._keep(layer, "q")),
                attention.to_k.register_forward_hook(self._keep(layer, "k")),
                attention.register_forward_hook(self._record(layer, factor)),
            ]
        _register_callback()
        _live.append(self)

    def denoiser_call(self, params: Any) -> None:
        """A denoiser call begins: its UNet calls cover its rows from the first."""
        text = params.text_cond["crossattn"] if isinstance(params.text_cond, dict) else params.text_cond
        self._offset = 0
        self._rows_known = text.shape[0] == len(self.cond_items)

    def _guarded(self, work: Callable[[], None]) -> None:
        if not self.is_current():
            self.remove()
            return
        try:
            work()
        except Exception as error:  # a failure must cost the maps, not the generation
            log.exception("AlignIT: recording attention maps")
            self.error = f"{type(error).__name__}: {error}"
            self.remove()

    def _unet_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        def work() -> None:
            x = args[0] if args else kwargs["x"]
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            first, self._offset = self._offset, self._offset + x.shape[0]
            rows = [row for row in range(x.shape[0]) if first + row < len(self.cond_items)]
            self._call = None
            if rows and context is not None and self._rows_known:
                self._call = self.recorder.match(context, rows, [self.cond_items[first + row] for row in rows])
            self._latent = (int(x.shape[-2]), int(x.shape[-1]))

        self._guarded(work)

    def _keep(self, layer: str, name: str) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._call is not None:
                self._kept.setdefault(layer, {})[name] = output

        return hook

    def _record(self, layer: str, factor: int) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            kept = self._kept.pop(layer, {})
            call = self._call
            if call is None or "q" not in kept or "k" not in kept:
                return

            def work() -> None:
                grid = layer_grid(self._latent, factor, kept["q"].shape[1])
                if grid is not None:
                    self.recorder.add(call, kept["q"], kept["k"], _heads(module), self._latent, grid)

            self._guarded(work)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._kept.clear()
        self._call = None
        if self in _live:
            _live.remove(self)


def _heads(attention: torch.nn.Module) -> int:
    heads = attention.heads  # ldm and sgm CrossAttention
    assert isinstance(heads, int)
    return heads
