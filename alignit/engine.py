"""Turn p's conditioning into AlignIT's: lay out the marked prompt, encode each concept's p', splice its rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .concepts import ConceptError, Options
from .layout import CHUNK_ROWS, Chunk, LayoutOptions, Span, Tokenizer, layout_prompt
from .prompt import MARK_OPEN, strip_markers
from .schedule import refine_schedule
from .splice import dummy_chunk, splice_chunk


class LayoutMismatch(RuntimeError):
    """AlignIT's layout of a prompt differs from the host's own: the prompt is left as the host encoded it."""


class TextEncoder(Tokenizer, Protocol):
    """A host's text encoder, seen the way the WebUI's own sees a prompt."""

    layout_options: LayoutOptions

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        """Encode one 77-token chunk with embedding vectors inserted at ``fixes``; returns 77 x C rows."""
        ...

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        """Raise LayoutMismatch if ``chunks`` is not how the host lays out ``plain_text``."""
        ...


@dataclass(frozen=True)
class ConceptSource:
    """A concept ready to encode: ``handle`` is what the host inserts at the concept's rows (its embedding)."""

    name: str
    vectors: int
    handle: Any


@dataclass
class Splicer:
    """Computes AlignIT rows for the prompts of one generation; caches every p' it encodes."""

    encoder: TextEncoder
    sources: Sequence[ConceptSource | None]
    options: Options
    warnings: list[str] = field(default_factory=list)
    _dummy_rows: dict[tuple, torch.Tensor] = field(default_factory=dict)
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
        if span.part or source is None:
            return torch.empty(0)
        dummy = dummy_chunk(chunk, span, source.vectors, self.placeholder_id)
        key = (tuple(dummy.tokens), tuple(dummy.multipliers), dummy.fix_offset, span.concept)
        if key not in self._dummy_rows:
            with torch.no_grad():
                rows = self.encoder.encode_chunk(dummy.tokens, dummy.multipliers, [(dummy.fix_offset, source.handle)])
            self._dummy_rows[key] = rows[dummy.rows]
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
                self.concept_rows(chunk, span)

    def splice(self, marked_text: str, rows: torch.Tensor) -> torch.Tensor:
        """AlignIT's conditioning for one prompt text, given p's (``rows``: 77k x C, as the host encoded it)."""
        chunks = self.layout(marked_text)
        if rows.shape[0] < len(chunks) * CHUNK_ROWS:
            raise LayoutMismatch(f"{rows.shape[0]} rows of conditioning for a prompt of {len(chunks)} chunks")
        out = rows.clone()
        for i, chunk in enumerate(chunks):
            spans = {span: self.concept_rows(chunk, span) for span in chunk.spans if self.sources[span.concept] is not None}
            if not spans:
                continue
            window = slice(i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS)
            strengths = [concept.strength for concept in self.options.concepts]
            spliced = splice_chunk(rows[window], chunk, spans, strengths)
            out[window] = spliced.rows
            if spliced.dropped_concept_rows:
                self.warn(
                    f"chunk {i + 1} of '{strip_markers(marked_text)[:60]}' is full: "
                    f"{spliced.dropped_concept_rows} concept vector(s) left out"
                )
        return out

    def align_schedule(
        self, schedule: Sequence[tuple[int, torch.Tensor]], marked: Sequence[tuple[int, str]]
    ) -> list[tuple[int, torch.Tensor]]:
        """AlignIT's version of one prompt's schedule ``[(end_at_step, cond)]``, given the marked texts of its entries."""
        if [end for end, _ in schedule] != [end for end, _ in marked]:
            raise LayoutMismatch("the prompt's schedule differs from the one AlignIT planned")
        aligned = [self.splice(text, cond) if MARK_OPEN in text else cond for (_, cond), (_, text) in zip(schedule, marked)]
        return refine_schedule(schedule, aligned, self.options.step_start, self.options.step_end)

    def warn(self, message: str) -> None:
        """Keep a message for the host to show (hosts drain ``warnings``)."""
        if message not in self.warnings:
            self.warnings.append(message)
