"""Key/value injection for weight-side concepts (LoRA, Custom Diffusion).

A concept's rows c' reach every cross-attention layer inside the conditioning; its keys and values must be
``(W + ΔW)·c'`` (LoRA) or ``W_cd·c'`` (Custom Diffusion) while every other row keeps ``W·c``. ``KVRewriter`` finds
the concept rows in a layer's context by their values (so no batch layout is assumed: cond/uncond order, AND parts,
batch size, padding and tiling do not matter) and rewrites those rows of the projection's output only. ``ΔW·c'`` is
computed once per pass; a LoRA stays low-rank. In the "full" scope the WebUI applies the LoRA to the whole UNet, and
the rewriter takes ``ΔW·x`` back out of every other row. Hosts run it from forward hooks on ``attn2.to_k``/``to_v``
(``KVInjector``, A1111) or from attention patches (``hosts/forge_attention.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConceptError

log = logging.getLogger("alignit")


@dataclass(frozen=True)
class LowRank:
    """``ΔW = scale · up @ down`` (down: r x in, up: out x r), never materialised."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def times(self, multiplier: float) -> LowRank:
        return LowRank(self.down, self.up, self.scale * multiplier)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW · x`` for rows x (..., in)."""
        down, up = self.down.to(x), self.up.to(x)
        return F.linear(F.linear(x, down), up) * self.scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]


@dataclass(frozen=True)
class Replacement:
    """A full replacement weight (Custom Diffusion's fine-tuned to_k/to_v)."""

    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass(frozen=True)
class Dense:
    """A full-size ``ΔW`` (LoRA types that are not a plain product of two factors: LoHa, LoKr, DoRA)."""

    weight: torch.Tensor

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


Delta = LowRank | Dense
Projection = LowRank | Dense | Replacement
Key = tuple[str, str]  # (layer path relative to the UNet, "k" | "v")


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer: torch's, or a host's own class of that name (Forge builds its models with its own Linear)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear"


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, also where its weight is stored quantized."""
    out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
    return (out_features, in_features) if out_features and in_features else tuple(module.weight.shape)


def check_fits(name: str, weights: Mapping[Key, Projection], modules: Mapping[Key, torch.nn.Module]) -> None:
    """ConceptError when a concept's K/V weights name layers or shapes this UNet does not have."""
    missing = [key for key in weights if key not in modules]
    if missing:
        raise ConceptError(f"'{name}' was made for another model: this UNet has no layer {missing[0][0]}")
    for key, projection in weights.items():
        have = linear_shape(modules[key])
        if projection.shape != have:
            raise ConceptError(f"'{name}' was made for another model: {key[0]}.to_{key[1]} is {projection.shape}, here {have}")


@dataclass
class ConceptKV:
    """One weight-side concept: its rows as spliced into the conditioning, and its per-layer projections."""

    rows: torch.Tensor
    weights: Mapping[Key, Projection]


@dataclass
class _Layer:
    set_rows: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (table rows start, stop, rows to write)
    add_rows: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (table rows start, stop, rows to add)
    remove: list[Delta] = field(default_factory=list)  # full scope: ΔW·x taken out of every other row


class KVRewriter:
    """Rewrites one cross-attention projection's output: the concept rows get their customized keys/values.

    Host-agnostic: a host calls ``rewrite`` with the context that went into ``to_k``/``to_v`` and what came out.
    """

    def __init__(self, concepts: Sequence[ConceptKV], global_lora: Sequence[tuple[Key, Delta]] = ()):
        rows = [concept.rows for concept in concepts if len(concept.rows)]
        self.table = torch.cat(rows) if rows else torch.empty(0)
        self.hits_by_layer: dict[Key, int] = {}
        self.layers: dict[Key, _Layer] = {}
        start = 0
        with torch.no_grad():
            for concept in concepts:
                stop = start + len(concept.rows)
                for key, projection in concept.weights.items():
                    layer = self.layers.setdefault(key, _Layer())
                    if isinstance(projection, Replacement):
                        layer.set_rows.append((start, stop, F.linear(concept.rows.to(projection.weight), projection.weight)))
                    else:
                        layer.add_rows.append((start, stop, projection.delta(concept.rows.float())))
                start = stop
            for key, projection in global_lora:
                self.layers.setdefault(key, _Layer()).remove.append(projection)
        self._last: tuple[torch.Tensor, int | None, torch.Tensor] | None = None
        self._copies: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _placed(self, tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` on ``like``'s device (and dtype), copied once per pass rather than at every layer call."""
        dtype = dtype or like.dtype
        key = (id(tensor), like.device, dtype)
        entry = self._copies.get(key)
        if entry is None or entry[0] is not tensor:
            entry = self._copies[key] = (tensor, tensor.to(device=like.device, dtype=dtype))
        return entry[1]

    def _hits(self, context: torch.Tensor) -> torch.Tensor:
        """(n, 3) indices ``(batch, token, table row)`` of the concept rows in a context; cached per context.

        The cache holds the context itself, so its memory cannot pass to the next step's context while the entry
        lives (an address says nothing then); inference tensors (Forge samples in inference mode) have no version
        counter and are never written in place between the layers of one UNet call.
        """
        version = None if context.is_inference() else context._version
        if self._last is None or self._last[0] is not context or self._last[1] != version:
            table = self._placed(self.table, context)
            # Candidates by each row's first value, then a full comparison of those few rows only.
            if len(table) == 0:
                hits = torch.empty(0, 3, dtype=torch.long, device=context.device)
            else:
                hits = (context[..., :1] == table[:, 0]).nonzero()
            if len(hits):
                same = (context[hits[:, 0], hits[:, 1]] == table[hits[:, 2]]).all(-1)
                hits = hits[same]
            self._last = (context, version, hits)
        return self._last[2]

    def release(self) -> None:
        """Drop the cached context and device copies."""
        self._last = None
        self._copies.clear()

    def rewrite(
        self, key: Key, context: torch.Tensor, output: torch.Tensor, batch_rows: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``output`` (= the base projection of ``context``) with the concept rows rewritten; None: nothing to change.

        batch_rows: when given, the batch rows that may hold concept rows (the cond rows); others are left alone.
        """
        layer = self.layers.get(key)
        if layer is None:
            return None
        hits = self._hits(context)
        if batch_rows is not None and len(hits):
            hits = hits[torch.isin(hits[:, 0], self._placed(batch_rows, hits))]
        self.hits_by_layer[key] = self.hits_by_layer.get(key, 0) + len(hits)
        if not len(hits) and not layer.remove:
            return None
        output = output.clone()
        if layer.remove:
            taken = sum(projection.delta(context) for projection in layer.remove).to(output.dtype)
            taken[hits[:, 0], hits[:, 1]] = 0  # concept rows keep the WebUI's (W + ΔW)·c'
            output -= taken
        for start, stop, values in layer.set_rows:
            self._write(output, hits, start, stop, values, add=False)
        for start, stop, values in layer.add_rows:
            self._write(output, hits, start, stop, values, add=True)
        return output

    def _write(self, output: torch.Tensor, hits: torch.Tensor, start: int, stop: int, values: torch.Tensor, add: bool) -> None:
        selected = hits[(hits[:, 2] >= start) & (hits[:, 2] < stop)]
        rows = self._placed(values, output)[selected[:, 2] - start]
        if add:
            output[selected[:, 0], selected[:, 1]] += rows
        else:
            output[selected[:, 0], selected[:, 1]] = rows

    def unmatched_layers(self) -> list[Key]:
        """Layers that ran without ever seeing a concept row (a hypernetwork or UNet replacement in the way)."""
        return [key for key, count in self.hits_by_layer.items() if count == 0]
