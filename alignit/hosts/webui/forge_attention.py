"""Weight-side concepts on Forge: an ``attn2`` patch pair on a cloned UNet patcher, with Forge's patch API.

Forge's ``BasicTransformerBlock._forward`` (backend/nn/unet.py 236-259) runs the ``attn2_patch`` list on the block's
context, then, when a replace patch is registered for the block, projects ``k = to_k(context)``,
``v = to_v(value)`` and calls ``replace(q, k, v, extra_options)`` in place of the attention. AlignIT registers:

- an ``attn2_patch`` that only notes the context and value the block is about to project;
- a replace patch per cross-attention layer the concepts touch, which rewrites the concept rows of ``k``/``v`` (found
  by value in that context, within the cond rows of the batch) and then calls the patch it found in that slot
  (IP-Adapter, say) or Forge's ``attention_function``, as the unpatched layer would.

``ModelPatcher.clone`` deep-copies ``model_options``; the patches are closures over one shared state, which
deepcopy keeps as they are, so a later clone by another extension still reports to this state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ...attn2_slots import Seen, block_key, block_of, rewrite_seen
from ...kv import Key, KVRewriter

log = logging.getLogger("alignit")

Attention = Callable[..., torch.Tensor]  # backend.attention.attention_function(q, k, v, heads, mask=None)


class AttentionPatch:
    """AlignIT's K/V rewriting installed on one Forge ``UnetPatcher`` for one sampling pass."""

    def __init__(self, rewriter: KVRewriter, attention: Attention):
        self.rewriter = rewriter
        self.attention = attention
        self.active = True
        self.error: str | None = None
        self._seen: Seen | None = None

    def install(self, unet: Any) -> None:
        """Register the patches on ``unet`` (a clone the caller owns), wrapping replace patches already there."""
        replaced = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        unet.set_model_attn2_patch(self._observer())
        for layer in sorted({layer for layer, _ in self.rewriter.layers}):
            name, number, index = block_key(layer)
            inner = replaced.get((name, number, index)) or replaced.get((name, number))
            unet.set_model_attn2_replace(self._replacement(layer, inner), name, number, index)

    def _observer(self) -> Callable:
        def observe(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict) -> tuple:
            if self.active:
                self._seen = (block_of(extra_options), context, context if value is None else value)
            return n, context, value

        return observe

    def _replacement(self, layer: str, inner: Callable | None) -> Callable:
        def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            seen, self._seen = self._seen, None
            if self.active:
                try:
                    k, v = rewrite_seen(self.rewriter, layer, seen, extra_options, k, v)
                except Exception as error:  # a failure must cost the concept's K/V weights, not the generation
                    log.exception("AlignIT: rewriting keys/values")
                    self.error = f"{type(error).__name__}: {error}"
                    self.remove()
            if inner is not None:
                return inner(q, k, v, extra_options)
            return self.attention(q, k, v, extra_options["n_heads"])

        return replace

    def unmatched_layers(self) -> list[Key]:
        return self.rewriter.unmatched_layers()

    def remove(self) -> None:
        """Make the patches pass-through (Forge drops the patched clone when it resets ``forge_objects``)."""
        self.active = False
        self._seen = None
        self.rewriter.release()
