"""A text-encoder LoRA applied functionally while p' is encoded, without changing any weight of the host's encoder.

- transformers CLIP text models (CLIP-L; Forge's OpenCLIP-G): forward hooks add ``ΔW·x`` to each matched Linear.
- open_clip text towers (A1111's OpenCLIP-G, sgm's ``FrozenOpenCLIPEmbedder2``): attention is an
  ``nn.MultiheadAttention`` whose fused ``in_proj_weight`` and ``out_proj`` are used by ``F.multi_head_attention_forward``
  and never called as modules, so no hook can carry a q/k/v/out delta. Each touched attention gets an instance-level
  ``forward`` for the duration that computes ``F.multi_head_attention_forward`` with ``in_proj_weight + ΔW_qkv`` and
  ``out_proj.weight + ΔW_out``; the MLP's ``c_fc``/``c_proj`` get forward hooks. A LoRA names these modules as
  transformers does (``encoder_layers_N_self_attn_q_proj``, ``…_mlp_fc1``): they map to ``resblocks.N.attn`` (q, k, v,
  out) and ``resblocks.N.mlp.c_fc``/``c_proj``, as A1111's Lora extension maps ``lora_te2_`` names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConceptError
from .kv import Delta, is_linear, linear_shape

_OPEN_CLIP_NAME = re.compile(r"^encoder_layers_(\d+)_(?:self_attn_(q|k|v|out)_proj|mlp_fc([12]))$")
SLOTS = ("q", "k", "v")


def _check_shape(name: str, delta: Delta, shape: tuple[int, int]) -> None:
    if delta.shape != shape:
        raise ConceptError(f"the LoRA's text-encoder part {name} is {delta.shape}, this text encoder's {shape}: another model")


def _hooks(modules: Mapping[str, torch.nn.Module], factors: Mapping[str, Delta]) -> list[Any]:
    return [
        modules[name].register_forward_hook(lambda m, i, o, p=projection: o + p.delta(i[0]).to(o.dtype))
        for name, projection in factors.items()
    ]


def linear_modules(text_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A transformers CLIP text model's Linear layers by the names LoRAs give them (``encoder_layers_0_mlp_fc1``)."""
    return {
        name.replace(".", "_").removeprefix("text_model_"): module
        for name, module in text_model.named_modules()
        if is_linear(module)
    }


@contextlib.contextmanager
def text_lora(text_model: torch.nn.Module, factors: Mapping[str, Delta]) -> Iterator[None]:
    """Apply a text-encoder LoRA functionally (``y + ΔW·x`` on each matched Linear) while the block runs."""
    modules = linear_modules(text_model)
    unknown = [name for name in factors if name not in modules]
    if unknown:
        raise ConceptError(f"the LoRA's text-encoder part names {unknown[0]}, which this text encoder does not have")
    for name, delta in factors.items():
        _check_shape(name, delta, linear_shape(modules[name]))
    handles = _hooks(modules, factors)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def open_clip_module(transformer: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str | None]:
    """The module of an open_clip text tower (``resblocks``) a LoRA's transformers-style name acts on: the block's
    ``nn.MultiheadAttention`` with the slot ``"q"``, ``"k"``, ``"v"`` or ``"out"``, or an MLP Linear (slot None)."""
    match = _OPEN_CLIP_NAME.match(name)
    blocks = getattr(transformer, "resblocks", None)
    if match is None or blocks is None or int(match[1]) >= len(blocks):
        raise ConceptError(f"the LoRA's OpenCLIP-G part names {name}, which this text encoder does not have")
    block = blocks[int(match[1])]
    if match[2]:
        return block.attn, match[2]
    return (block.mlp.c_fc if match[3] == "1" else block.mlp.c_proj), None


def _attention_forward(attention: torch.nn.MultiheadAttention, deltas: Mapping[str, Delta]) -> Any:
    """A ``forward`` for one ``nn.MultiheadAttention`` (batched or not, ``batch_first`` or not) that attends with the
    LoRA's deltas added to its current weights."""
    width = attention.embed_dim
    own = attention.forward  # the host's, whatever it patched in

    def matrix(slot: str, like: torch.Tensor) -> torch.Tensor:
        delta = deltas.get(slot)
        return torch.zeros(width, width, dtype=like.dtype, device=like.device) if delta is None else delta.matrix().to(like)

    def forward(
        query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False
    ):
        # The host's own forward runs first, its output unused: what it does to the weights before attending (A1111's
        # Lora extension applies the prompt's networks there) has happened before the weights are read.
        own(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        in_proj: torch.Tensor = attention.in_proj_weight
        out_proj: torch.Tensor = attention.out_proj.weight
        if any(slot in deltas for slot in SLOTS):
            in_proj = in_proj + torch.cat([matrix(slot, in_proj) for slot in SLOTS])
        if "out" in deltas:
            out_proj = out_proj + matrix("out", out_proj)
        batched_first = attention.batch_first and query.dim() == 3
        if batched_first:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            width,
            attention.num_heads,
            in_proj,
            attention.in_proj_bias,
            attention.bias_k,
            attention.bias_v,
            attention.add_zero_attn,
            attention.dropout,
            out_proj,
            attention.out_proj.bias,
            training=attention.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (output.transpose(1, 0) if batched_first else output), weights

    return forward


@contextlib.contextmanager
def open_clip_text_lora(transformer: torch.nn.Module, factors: Mapping[str, Delta]) -> Iterator[None]:
    """Apply a text-encoder LoRA functionally to an open_clip text tower while the block runs (see the module)."""
    attentions: dict[torch.nn.MultiheadAttention, dict[str, Delta]] = {}
    linears: dict[str, torch.nn.Module] = {}
    for name, delta in factors.items():
        module, slot = open_clip_module(transformer, name)
        if slot is None:
            _check_shape(name, delta, linear_shape(module))
            linears[name] = module
            continue
        if not isinstance(module, torch.nn.MultiheadAttention) or not module._qkv_same_embed_dim:
            raise ConceptError(f"the LoRA's OpenCLIP-G part {name}: this text encoder's attention is not one AlignIT knows")
        _check_shape(name, delta, (module.embed_dim, module.embed_dim))
        attentions.setdefault(module, {})[slot] = delta
    replaced = []
    handles = _hooks(linears, {name: factors[name] for name in linears})
    try:
        for attention, deltas in attentions.items():
            replaced.append((attention, attention.__dict__.get("forward")))
            attention.forward = _attention_forward(attention, deltas)  # type: ignore[method-assign]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attention, previous in replaced:
            if previous is None:
                del attention.forward
            else:
                attention.forward = previous  # type: ignore[method-assign]


@dataclass(frozen=True)
class TextTower:
    """A text encoder's transformer as a LoRA sees it: a transformers CLIP text model, or an open_clip text tower's
    ``Transformer`` (``open_clip``)."""

    model: torch.nn.Module
    open_clip: bool = False

    @property
    def width(self) -> int:
        model: Any = self.model
        width = model.width if self.open_clip else model.config.hidden_size
        return int(width)

    def module(self, name: str) -> tuple[torch.nn.Module, str | None]:
        """The module a LoRA's module name acts on, and its attention slot (``"q"``… on an open_clip attention)."""
        if self.open_clip:
            return open_clip_module(self.model, name)
        module = linear_modules(self.model).get(name)
        if module is None:
            raise ConceptError(f"the LoRA's text-encoder part names {name}, which this text encoder does not have")
        return module, None

    def lora(self, factors: Mapping[str, Delta]) -> contextlib.AbstractContextManager[None]:
        """The LoRA applied functionally while the block runs."""
        return (open_clip_text_lora if self.open_clip else text_lora)(self.model, factors)


@contextlib.contextmanager
def tower_loras(towers: Sequence[TextTower], parts: Sequence[Mapping[str, Delta]]) -> Iterator[None]:
    """Each tower's LoRA part (``parts[i]`` on ``towers[i]``) applied while the block runs."""
    with contextlib.ExitStack() as stack:
        for tower, factors in zip(towers, parts, strict=True):
            if factors:
                stack.enter_context(tower.lora(factors))
        yield
