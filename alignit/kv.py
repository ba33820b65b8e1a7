"""Keys and values for weight-side concepts (LoRA, Custom Diffusion), rewritten at the concept rows only.

A concept's rows c' reach every cross-attention layer inside the conditioning, blended by the concept's strength s
towards the class word's rows: ``c_s = lerp(c_class, c', s)``. Its keys and values must be
``lerp(W·c_class, (W + ΔW)·c', s)`` (LoRA) or ``lerp(W·c_class, W_cd·c', s)`` (Custom Diffusion), while every other
row keeps ``W·c``. The layer computes ``W·c_s``, which is ``lerp(W·c_class, W·c', s)`` (K is linear in c), so the
rewriter adds ``s·ΔW·c'`` (LoRA) or ``s·(W_cd·c' − W·c')`` (Custom Diffusion) there. At s = 0 the splice keeps the
class word's own rows and nothing is rewritten.

Which rows are concept rows is decided per 77-row chunk, not per row: a chunk of a layer's context holds a concept
only if it is bit for bit a chunk AlignIT spliced (``MarkedChunk``), and then the concept rows are the positions the
splice put them at. A row of another prompt, of the negative prompt or of an AND part that happens to equal a concept
row is never touched. No batch layout is assumed (cond/uncond order, AND parts, batch size, padding, tiling).

Per UNet call the chunks of the context are compared once with the table; per layer the rewrite is one gather and
one ``index_add_`` over the concept rows of every chunk window, masked by that comparison: no host-device
synchronisation. In the "full" scope the WebUI applies the LoRA to the whole UNet and the rewriter takes ``ΔW·x``
back out of every row first. Hosts run it from forward hooks on ``to_k``/``to_v`` (``kv_hooks.py``: A1111, diffusers)
or attn2 patches (``attn2_slots.py``: Forge, ComfyUI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConceptError

CHUNK = 77  # rows of one chunk of conditioning


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

    def matrix(self) -> torch.Tensor:
        """``ΔW`` itself (out x in)."""
        return (self.up @ self.down) * self.scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]


@dataclass(frozen=True)
class Replacement:
    """A full replacement weight (Custom Diffusion's fine-tuned to_k/to_v)."""

    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


@dataclass(frozen=True)
class Dense:
    """A full-size ``ΔW`` (LoRA types that are not a plain product of two factors: LoHa, LoKr, (IA)³, DoRA)."""

    weight: torch.Tensor

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x))

    def matrix(self) -> torch.Tensor:
        return self.weight

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


Delta = LowRank | Dense
Projection = LowRank | Dense | Replacement
Key = tuple[str, str]  # (layer path relative to the UNet, "k" | "v")


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer: torch's, or a host's own class of that name (Forge builds its models with its own Linear)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear"


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, also where its weight is stored quantized."""
    out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if out_features and in_features:
        return out_features, in_features
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0]), int(weight.shape[1])


def check_layers(name: str, keys: Iterable[Key], modules: Mapping[Key, torch.nn.Module]) -> None:
    """ConceptError when a concept's K/V weights name layers this UNet does not have."""
    missing = [key for key in keys if key not in modules]
    if missing:
        raise ConceptError(f"'{name}' was made for another model: this UNet has no layer {missing[0][0]}")


def check_fits(name: str, weights: Mapping[Key, Projection], modules: Mapping[Key, torch.nn.Module]) -> None:
    """ConceptError when a concept's K/V weights name layers or shapes this UNet does not have."""
    check_layers(name, weights, modules)
    for key, projection in weights.items():
        have = linear_shape(modules[key])
        if projection.shape != have:
            raise ConceptError(f"'{name}' was made for another model: {key[0]}.to_{key[1]} is {projection.shape}, here {have}")


@dataclass(frozen=True)
class ConceptRows:
    """One weight-side concept's rows in a spliced chunk: their positions, c' there (before the strength blend), s."""

    concept: int
    positions: tuple[int, ...]
    rows: torch.Tensor
    strength: float


@dataclass(frozen=True)
class MarkedChunk:
    """A 77-row chunk of conditioning exactly as AlignIT spliced it, and the weight-side concept rows it holds."""

    rows: torch.Tensor
    concepts: tuple[ConceptRows, ...]


Project = Callable[[Key, torch.Tensor], torch.Tensor]
"""The host's own projection of rows by a layer (``W·x``, as the layer computes it now), for Custom Diffusion."""


@dataclass
class _Entry:
    chunk: int
    concept: ConceptRows
    projection: Projection


@dataclass
class _Layer:
    entries: list[_Entry] = field(default_factory=list)
    remove: list[Delta] = field(default_factory=list)  # full scope: ΔW·x taken out of every row


@dataclass(frozen=True)
class _Prepared:
    """A layer's concept rows on the output's device: per window, the row index in the context and its table chunk."""

    index: torch.Tensor  # (windows · n,) rows of the context
    chunk_of_row: torch.Tensor  # (n,) table chunk of each concept row
    delta: torch.Tensor  # (n, out) what each concept row gets added


class KVRewriter:
    """Rewrites one cross-attention projection's output: the concept rows get their customized keys/values.

    Host-agnostic: a host calls ``rewrite`` with the context that went into ``to_k``/``to_v`` and what came out.
    ``weights[i]`` are concept i's projections (``ConceptRows.concept`` indexes them); ``project`` is needed when one
    is a Custom Diffusion ``Replacement``.
    """

    def __init__(
        self,
        chunks: Sequence[MarkedChunk],
        weights: Sequence[Mapping[Key, Projection]],
        global_lora: Sequence[tuple[Key, Delta]] = (),
        project: Project | None = None,
    ):
        self.table = torch.stack([chunk.rows for chunk in chunks]) if chunks else torch.empty(0)
        self.project = project
        self.layers: dict[Key, _Layer] = {}
        for index, chunk in enumerate(chunks):
            for concept in chunk.concepts:
                for key, projection in weights[concept.concept].items():
                    if isinstance(projection, Replacement) and project is None:
                        raise ValueError("a Custom Diffusion concept needs the host's projection")
                    self.layers.setdefault(key, _Layer()).entries.append(_Entry(index, concept, projection))
        for key, delta in global_lora:
            self.layers.setdefault(key, _Layer()).remove.append(delta)
        self._seen: dict[Key, list[torch.Tensor]] = {}
        self._match: tuple[torch.Tensor, int | None, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
        self._prepared: dict[tuple[Key, torch.device, torch.dtype, int], _Prepared] = {}
        self._placed_table: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _matches(self, context: torch.Tensor, batch_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, windows, chunks) bool: which 77-row windows of the context are which marked chunk, and their count
        (a device scalar). Computed once per context: every layer of one UNet call sees the same context object.

        The cache holds the context itself, so its memory cannot pass to the next step's context while the entry lives;
        inference tensors (Forge samples in inference mode) have no version counter and are never written in place
        between the layers of one UNet call.
        """
        version = None if context.is_inference() else context._version
        cached = self._match
        if cached is not None and cached[0] is context and cached[1] == version and cached[2] is batch_rows:
            return cached[3], cached[4]
        batch, length, width = context.shape
        windows = length // CHUNK
        if len(self.table) == 0 or windows == 0:
            match = torch.zeros(batch, windows, len(self.table), dtype=torch.bool, device=context.device)
        else:
            table = self._placed_table.get((context.device, context.dtype))
            if table is None:
                table = self._placed_table[(context.device, context.dtype)] = self.table.to(context)
            framed = context[:, : windows * CHUNK].reshape(batch, windows, CHUNK, width)
            match = torch.stack([(framed == chunk).all(-1).all(-1) for chunk in table], dim=-1)
            if batch_rows is not None:
                allowed = torch.zeros(batch, dtype=torch.bool, device=context.device)
                allowed[batch_rows.to(context.device)] = True
                match &= allowed[:, None, None]
        count = match.sum()
        self._match = (context, version, batch_rows, match, count)
        return match, count

    def _prepare(self, key: Key, layer: _Layer, output: torch.Tensor, windows: int) -> _Prepared:
        """The layer's concept rows and what they get, on the output's device and dtype (once per pass)."""
        cache_key = (key, output.device, output.dtype, windows)
        prepared = self._prepared.get(cache_key)
        if prepared is not None:
            return prepared
        positions: list[int] = []
        chunks: list[int] = []
        deltas = []
        with torch.no_grad():
            for entry in layer.entries:
                rows = entry.concept.rows.float()
                if isinstance(entry.projection, Replacement):
                    assert self.project is not None
                    own = F.linear(rows, entry.projection.weight.float())
                    delta = own - self.project(key, entry.concept.rows.to(output)).float().cpu()
                else:
                    delta = entry.projection.delta(rows)
                positions += entry.concept.positions
                chunks += [entry.chunk] * len(entry.concept.positions)
                deltas.append(delta * entry.concept.strength)
        row_index = torch.tensor(positions, dtype=torch.long)
        index = (torch.arange(windows)[:, None] * CHUNK + row_index[None]).reshape(-1)
        prepared = _Prepared(
            index.to(output.device),
            torch.tensor(chunks, dtype=torch.long, device=output.device),
            torch.cat(deltas).to(output),
        )
        self._prepared[cache_key] = prepared
        return prepared

    def rewrite(
        self, key: Key, context: torch.Tensor, output: torch.Tensor, batch_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``output`` (= the host's projection of ``context``) with the concept rows rewritten, in place.

        batch_rows: when given, the batch rows that may hold concept rows (the cond rows); others are left alone.
        Everything is computed before the first write, so a failure leaves ``output`` as it was.
        """
        layer = self.layers.get(key)
        if layer is None:
            return output
        removed = [delta.delta(context).to(output.dtype) for delta in layer.remove]
        added = None
        if layer.entries:
            match, count = self._matches(context, batch_rows)
            batch, windows = match.shape[:2]
            prepared = self._prepare(key, layer, output, windows)
            hit = match[:, :, prepared.chunk_of_row, None]  # (batch, windows, n, 1)
            zero = torch.zeros((), dtype=output.dtype, device=output.device)
            added = (prepared.index, torch.where(hit, prepared.delta, zero).reshape(batch, -1, output.shape[-1]))
            seen = self._seen.setdefault(key, [])
            if not seen or seen[-1] is not count:
                seen.append(count)
        for taken in removed:
            output -= taken
        if added is not None:
            output.index_add_(1, *added)
        return output

    def release(self) -> None:
        """Drop the cached context match and device copies."""
        self._match = None
        self._prepared.clear()
        self._placed_table.clear()

    def unmatched_layers(self) -> list[Key]:
        """Layers that ran without ever meeting a marked chunk (a hypernetwork or UNet replacement in the way).

        Reads the counts back from the device: call it once, after the pass."""
        return [key for key, counts in self._seen.items() if not int(torch.stack(counts).sum())]
