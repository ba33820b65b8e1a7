"""Weight-side concepts in ComfyUI: ``attn2`` patches on a clone of the MODEL (comfy/model_patcher.py 409-431).

``BasicTransformerBlock.forward`` (comfy/ldm/modules/attention.py 919-944) runs the ``attn2_patch`` list on the
block's unprojected ``(n, context, value)``; then, when a replace patch sits in the slot ``(block, id, block_index)`` or
``(block, id)``, it computes ``q = to_q(n)``, ``k = to_k(context)``, ``v = to_v(value)`` and calls
``replace(q, k, v, extra_options)`` in place of the attention. AlignIT registers on its clone:

- an ``attn2_patch`` that notes the context and value the block is about to project;
- for every cross-attention layer a concept touches, a replace patch in ``(block, id, block_index)`` that rewrites the
  concept rows of ``k``/``v`` with the ``KVRewriter`` (only 77-row windows of that context that are bit for bit a chunk
  AlignIT spliced, only in the batch rows ``cond_or_uncond`` marks as cond) and hands them to the replace patch it
  found in that slot or in ``(block, id)`` (IPAdapter's, say), or else to ComfyUI's ``optimized_attention``, as the
  unpatched layer would.

``ModelPatcher.clone`` deep-copies ``model_options``: the observer is a closure, which deepcopy keeps; a replace
patch copies itself with a deep copy of the patch it wraps (what that patch would get without AlignIT) but keeps
AlignIT's state. A node that puts its own replace patch on AlignIT's MODEL output takes the slot: such nodes
(IPAdapter) belong before AlignIT Text Encode, and one that would extend AlignIT's patch is told so.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from comfy.ldm.modules import attention

from ...attn2_slots import Seen, block_key, block_of, rewrite_seen
from ...kv import KVRewriter

log = logging.getLogger("alignit")


class AttentionPatch:
    """AlignIT's K/V rewriting on one MODEL clone; a failure turns it into a pass-through (with one console line)."""

    def __init__(self, rewriter: KVRewriter):
        self.rewriter = rewriter
        self.active = True
        self._seen: Seen | None = None

    def install(self, model: Any) -> None:
        """Register the patches on ``model`` (a clone the caller owns), wrapping replace patches already there.

        The block's ``(block, id)`` slot, which ComfyUI consults for the layers without a slot of their own, gets a
        pass-through of what it held: the patch there keeps working, and a node that later finds it there to extend
        (IPAdapter does so for SD1.x) is told where it belongs instead of being shadowed by AlignIT's patches."""
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        model.set_model_attn2_patch(self._observer())
        blocks = set()
        for layer in sorted({layer for layer, _ in self.rewriter.layers}):
            name, number, index = block_key(layer)
            inner = replaced.get((name, number, index)) or replaced.get((name, number))
            model.set_model_attn2_replace(Replace(self, layer, inner), name, number, index)
            blocks.add((name, number))
        for name, number in sorted(blocks):
            model.set_model_attn2_replace(Replace(self, None, replaced.get((name, number))), name, number)

    def _observer(self) -> Callable:
        def observe(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict) -> tuple:
            if self.active:
                self._seen = (block_of(extra_options), context, context if value is None else value)
            return n, context, value

        return observe

    def attend(
        self, layer: str | None, inner: Callable | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict
    ) -> Any:
        """The replace patch of ``layer``: rewrite the concept rows of k/v, then attend as the slot would have."""
        seen, self._seen = self._seen, None
        if layer is not None and self.active:
            try:
                k, v = rewrite_seen(self.rewriter, layer, seen, extra, k, v)
            except Exception:  # a failure must cost the concept's K/V weights, not the image
                log.exception("AlignIT: rewriting keys/values; the concepts' own key/value weights are left out from here on")
                self.active = False
                self.rewriter.release()
        if inner is not None:
            return inner(q, k, v, extra)
        precision = extra.get("attn_precision")
        return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=precision, transformer_options=extra)


class Replace:
    """The replace patch AlignIT puts in one layer's slot (``layer`` None: a block's pass-through); ``inner`` is the
    patch it found there."""

    def __init__(self, patch: AttentionPatch, layer: str | None, inner: Callable | None):
        self.patch, self.layer, self.inner = patch, layer, inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> Any:
        return self.patch.attend(self.layer, self.inner, q, k, v, extra_options)

    def __deepcopy__(self, memo: dict) -> Replace:
        return Replace(self.patch, self.layer, copy.deepcopy(self.inner, memo))

    def add(self, *args: Any, **kwargs: Any) -> None:
        """What IPAdapter-style nodes call on a patch they find in a slot: refused with a message saying what to do."""
        raise RuntimeError(
            "this MODEL comes out of AlignIT Text Encode, whose attention patches another node cannot extend: connect "
            "that node (IPAdapter, …) before AlignIT Text Encode, into its model input"
        )
