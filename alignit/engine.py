"""Turn p's conditioning into AlignIT's: lay out the marked prompt, encode each concept's p', splice its rows."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .concepts import Concept, Options, SourceKind, SourceSpec, parse_source
from .errors import ConceptError, LayoutMismatch
from .kv import ConceptRows, Delta, Key, MarkedChunk, Projection
from .layout import CHUNK_ROWS, Chunk, LayoutOptions, Span, Tokenizer, layout_prompt
from .prompt import MARK_OPEN, strip_markers
from .schedule import refine_schedule
from .splice import Origin, dummy_chunk, splice_chunk, splice_order

Cond = torch.Tensor | Mapping[str, torch.Tensor]


def _rows(cond: Cond) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, Mapping) else cond


def _with_rows(cond: Cond, rows: torch.Tensor) -> Cond:
    return {**cond, "crossattn": rows} if isinstance(cond, Mapping) else rows


class TextEncoder(Tokenizer, Protocol):
    """A host's text encoder, seen the way the WebUI's own sees a prompt."""

    layout_options: LayoutOptions

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        """Encode one 77-token chunk with embedding vectors inserted at ``fixes``; returns 77 x C rows."""
        ...

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        """Raise LayoutMismatch if ``chunks`` is not how the host lays out ``plain_text``."""
        ...

    def embedding_handle(self, name: str, vectors: torch.Tensor) -> Any:
        """What ``encode_chunk`` takes as a fix for raw embedding vectors (n x C)."""
        ...


def check_same_layout(plain_text: str, chunks: Sequence[Chunk], host_layouts: Iterable[Sequence[Any]]) -> None:
    """LayoutMismatch unless each host layout (a WebUI's own ``tokenize_line`` chunks, with ``tokens``,
    ``multipliers`` and ``fixes`` of ``offset``) is ``chunks``."""
    ours = [(c.tokens, c.multipliers, [offset for offset, _ in c.fixes]) for c in chunks]
    for own in host_layouts:
        if [(c.tokens, c.multipliers, [f.offset for f in c.fixes]) for c in own] != ours:
            raise LayoutMismatch(f"AlignIT lays out '{plain_text[:60]}' differently from the WebUI")


@dataclass(frozen=True)
class ConceptSource:
    """A concept ready to encode.

    tokens: what the concept occupies in p' (0 where embedding vectors go); fixes: (offset in the concept, handle).
    text_patch: customizes the host's text encoder while p' is encoded (a text-encoder LoRA).
    kv: per cross-attention projection, the concept's own weights (UNet LoRA, Custom Diffusion).
    global_kv: the part of ``kv`` the host applies to the whole UNet itself (a LoRA in the "full" scope), which
    the K/V rewriting takes back out of every row before giving the concept rows theirs.
    """

    name: str
    tokens: tuple[int, ...]
    fixes: tuple[tuple[int, Any], ...] = ()
    text_patch: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    kv: Mapping[Key, Projection] = field(default_factory=dict)
    global_kv: Mapping[Key, Delta] = field(default_factory=dict)

    @classmethod
    def embedding(cls, name: str, vectors: int, handle: Any) -> ConceptSource:
        """A textual-inversion concept: ``vectors`` rows from one embedding."""
        return cls(name, (0,) * vectors, ((0, handle),))

    @property
    def weight_side(self) -> bool:
        return bool(self.kv)


class SourceResolver(Protocol):
    """How a host turns each kind of concept source into a ``ConceptSource`` for its loaded model (ConceptError or
    Unsupported say why it cannot)."""

    def embedding(self, concept: Concept, spec: SourceSpec) -> ConceptSource: ...

    def lora(self, concept: Concept, spec: SourceSpec) -> ConceptSource: ...

    def custom_diffusion(self, concept: Concept, spec: SourceSpec) -> ConceptSource: ...


def resolve_source(concept: Concept, resolver: SourceResolver) -> ConceptSource:
    """The concept's source, by the kind its source text names."""
    spec = parse_source(concept)
    if spec.kind is SourceKind.LORA:
        return resolver.lora(concept, spec)
    if spec.kind is SourceKind.CUSTOM_DIFFUSION:
        return resolver.custom_diffusion(concept, spec)
    return resolver.embedding(concept, spec)


def concept_tokens(encoder: TextEncoder, text: str, embeddings: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple]:
    """Tokens and fixes of a trigger text in which the names of ``embeddings`` (modifier tokens) become vectors."""
    tokens = list(encoder.tokenize([text])[0])
    fixes = []
    for name, vectors in sorted(embeddings.items(), key=lambda item: -len(item[0])):
        ids = encoder.tokenize([name])[0]
        position = 0
        while position <= len(tokens) - len(ids):
            if tokens[position : position + len(ids)] == ids:
                tokens[position : position + len(ids)] = [0] * len(vectors)
                fixes.append((position, encoder.embedding_handle(name, vectors)))
                position += len(vectors)
            else:
                position += 1
    return tuple(tokens), tuple(fixes)


@dataclass
class Splicer:
    """Computes AlignIT rows for the prompts of one generation; caches every p' it encodes."""

    encoder: TextEncoder
    sources: Sequence[ConceptSource]
    options: Options
    warnings: list[str] = field(default_factory=list)
    _dummy_rows: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _marked: dict[bytes, MarkedChunk] = field(default_factory=dict)
    _layouts: dict[str, list[Chunk]] = field(default_factory=dict)
    _placeholder: int | None = None

    @property
    def placeholder_id(self) -> int:
        if self._placeholder is None:
            ids = self.encoder.tokenize([self.options.placeholder])[0]
            if len(ids) != 1:
                raise ConceptError(f"the placeholder '{self.options.placeholder}' is {len(ids)} tokens; it must be one")
            self._placeholder = ids[0]
        return self._placeholder

    def concept_rows(self, chunk: Chunk, span: Span) -> torch.Tensor:
        """The customized encoding of p' at the concept's rows (empty for the second part of a split span)."""
        source = self.sources[span.concept]
        if span.part:
            return torch.empty(0)
        dummy = dummy_chunk(chunk, span, source.tokens, self.placeholder_id)
        key = (tuple(dummy.tokens), tuple(dummy.multipliers), dummy.start, span.concept)
        if key not in self._dummy_rows:
            fixes = [(dummy.start + offset, handle) for offset, handle in source.fixes if offset < dummy.count]
            patch = source.text_patch() if source.text_patch else contextlib.nullcontext()
            with torch.no_grad(), patch:
                rows = self.encoder.encode_chunk(dummy.tokens, dummy.multipliers, fixes)[dummy.rows]
            if not torch.isfinite(rows).all():
                raise ConceptError(f"'{source.name}' encodes to values that are not finite (inf or NaN)")
            self._dummy_rows[key] = rows
        return self._dummy_rows[key]

    def layout(self, marked_text: str) -> list[Chunk]:
        """The checked layout of a marked prompt text (cached)."""
        if marked_text not in self._layouts:
            chunks = layout_prompt(marked_text, self.encoder, self.encoder.layout_options)
            self.encoder.check_layout(strip_markers(marked_text), chunks)
            self._layouts[marked_text] = chunks
        return self._layouts[marked_text]

    def prepare(self, marked_text: str) -> None:
        """Do all the work of a prompt text that does not need p's conditioning: layout, check, encode p'."""
        for chunk in self.layout(marked_text):
            for span in chunk.spans:
                if self.options.concepts[span.concept].strength:
                    self.concept_rows(chunk, span)

    def splice(self, marked_text: str, rows: torch.Tensor) -> torch.Tensor:
        """AlignIT's conditioning for one prompt text, given p's (``rows``: 77k x C, as the host encoded it)."""
        chunks = self.layout(marked_text)
        if rows.shape[0] < len(chunks) * CHUNK_ROWS:
            raise LayoutMismatch(f"{rows.shape[0]} rows of conditioning for a prompt of {len(chunks)} chunks")
        out = rows.clone()
        strengths = [concept.strength for concept in self.options.concepts]
        for i, chunk in enumerate(chunks):
            spans = self._spliced_spans(chunk)
            if not spans:
                continue
            window = slice(i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS)
            spliced = splice_chunk(rows[window], chunk, spans, strengths)
            out[window] = spliced.rows
            self._mark(spliced.rows, spans, spliced.placed, strengths)
            if spliced.dropped_concept_rows:
                self.warn(
                    f"chunk {i + 1} of '{strip_markers(marked_text)[:60]}' is full: "
                    f"{spliced.dropped_concept_rows} concept vector(s) left out"
                )
        return out

    def _spliced_spans(self, chunk: Chunk) -> dict[Span, torch.Tensor]:
        """The concept rows each span of the chunk gets. At strength 0 a concept is the class word: its span keeps p's
        rows, whatever their count."""
        strengths = [concept.strength for concept in self.options.concepts]
        return {span: self.concept_rows(chunk, span) for span in chunk.spans if strengths[span.concept]}

    def row_origins(self, marked_text: str) -> list[list[Origin]]:
        """Per chunk of a prepared prompt text, where each row of its spliced conditioning comes from (``splice``'s
        order)."""
        return [
            splice_order(chunk, {span: len(rows) for span, rows in self._spliced_spans(chunk).items()})[0]
            for chunk in self.layout(marked_text)
        ]

    def align_schedule(self, schedule: Sequence[tuple[int, Cond]], marked: Sequence[tuple[int, str]]) -> list[tuple[int, Cond]]:
        """AlignIT's version of one prompt's schedule ``[(end_at_step, cond)]``, given the marked texts of its entries.

        A cond is the rows, or a dict whose ``crossattn`` holds them (SDXL; its pooled ``vector`` stays the base's).
        """
        if [end for end, _ in schedule] != [end for end, _ in marked]:
            raise LayoutMismatch("the prompt's schedule differs from the one AlignIT planned")
        aligned = [
            _with_rows(cond, self.splice(text, _rows(cond))) if MARK_OPEN in text else cond
            for (_, cond), (_, text) in zip(schedule, marked)
        ]
        return refine_schedule(schedule, aligned, self.options.step_start, self.options.step_end)

    def _mark(
        self,
        rows: torch.Tensor,
        concept_rows: Mapping[Span, torch.Tensor],
        placed: Mapping[Span, list[tuple[int, int]]],
        strengths: Sequence[float],
    ) -> None:
        """Remember a spliced chunk that holds weight-side concept rows (strength 0 changes nothing: not kept)."""
        held = []
        for span, where in placed.items():
            strength = strengths[span.concept]
            if self.sources[span.concept].weight_side and where:
                c_rows = concept_rows[span].cpu().float()[[j for _, j in where]]
                held.append(ConceptRows(span.concept, tuple(position for position, _ in where), c_rows, strength))
        if held:
            chunk = rows.detach().cpu()
            self._marked.setdefault(bytes(chunk.contiguous().view(torch.uint8).numpy()), MarkedChunk(chunk, tuple(held)))

    def kv_chunks(self) -> list[MarkedChunk]:
        """Every chunk spliced so far that holds weight-side concept rows, for the host's K/V mechanism."""
        return list(self._marked.values())

    def kv_weights(self) -> list[Mapping[Key, Projection]]:
        """Each concept's K/V weights (``ConceptRows.concept`` indexes this list)."""
        return [source.kv for source in self.sources]

    def global_kv(self) -> list[tuple[Key, Delta]]:
        """What the host applies to the whole UNet for concepts in the "full" scope, to be taken out of every row."""
        return [item for source in self.sources for item in source.global_kv.items()]

    def warn(self, message: str) -> None:
        """Keep a message for the host to show (hosts drain ``warnings``)."""
        if message not in self.warnings:
            self.warnings.append(message)
