"""The ldm UNet A1111 runs: forward hooks on its cross-attention projections (``alignit.kv.attn2_modules``) that run
a ``KVRewriter`` for one sampling pass."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from ...kv import Delta, Key, KVRewriter, MarkedChunk, Projection, attn2_modules, module_projection

log = logging.getLogger("alignit")


class KVInjector:
    """Forward hooks on an ldm UNet's ``attn2.to_k``/``to_v`` running a KVRewriter; a context, or call ``remove``.

    ``is_current`` lets the host retire hooks that outlived their generation (after an error): they then do
    nothing and remove themselves.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        chunks: Sequence[MarkedChunk],
        weights: Sequence[Mapping[Key, Projection]],
        global_lora: Sequence[tuple[Key, Delta]] = (),
        is_current: Callable[[], bool] = lambda: True,
    ):
        modules = attn2_modules(unet)
        self.rewriter = KVRewriter(chunks, weights, global_lora, module_projection(modules))
        self.is_current = is_current
        self.error: str | None = None
        self._handles = [modules[key].register_forward_hook(self._hook(key)) for key in self.rewriter.layers if key in modules]

    def _hook(self, key: Key):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.is_current():
                self.remove()
                return None
            try:
                return self.rewriter.rewrite(key, inputs[0], output)
            except Exception as error:  # a failure must cost the concept's K/V weights, not the generation
                log.exception("AlignIT: rewriting keys/values")
                self.error = f"{type(error).__name__}: {error}"
                self.remove()
                return None

        return hook

    def unmatched_layers(self) -> list[Key]:
        return self.rewriter.unmatched_layers()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.rewriter.release()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> KVInjector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
