"""The dummy prompt p' of a class-word span, and the splice of concept rows into a chunk of p's conditioning.

A concept may need n rows where its class word took m. The chunk keeps 77 rows: surplus rows come out of
the chunk's EOS padding (the rows nearest the final EOS first); missing rows repeat the chunk's final row, as the
WebUI does when it stacks conditionings of different lengths. Every row that is not part of a span is p's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .layout import CHUNK_ROWS, CHUNK_TOKENS, PAD, Chunk, Span


@dataclass(frozen=True)
class DummyChunk:
    """Tokens and weights of p' for one span; the concept starts at ``start`` (not counting BOS), ``count`` slots."""

    tokens: list[int]
    multipliers: list[float]
    start: int
    count: int

    @property
    def rows(self) -> slice:
        return slice(self.start + 1, self.start + 1 + self.count)


def dummy_chunk(chunk: Chunk, span: Span, concept: Sequence[int], placeholder: int) -> DummyChunk:
    """p' for ``span``: every token of the chunk but the concept becomes ``placeholder``; padding stays padding.

    The concept takes the weight of its class word, the placeholders the weights of the tokens they stand for,
    so that emphasis (including the WebUI's mean-restoring "Original" mode) treats p' as it treats p.
    ``concept`` is the concept's token ids (0 where embedding vectors go); what does not fit the chunk is cut.
    """
    id_start, id_end = chunk.tokens[0], chunk.tokens[-1]
    before = span.start - 1
    concept = list(concept)[: max(0, CHUNK_TOKENS - before)]
    after = range(span.start + span.length, CHUNK_ROWS - 1)
    tokens = [placeholder] * before + concept
    weights = chunk.multipliers[1 : span.start] + [chunk.multipliers[span.start]] * len(concept)
    for row in after:
        tokens.append(id_end if chunk.tags[row] == PAD else placeholder)
        weights.append(chunk.multipliers[row])
    tokens, weights = tokens[:CHUNK_TOKENS], weights[:CHUNK_TOKENS]
    missing = CHUNK_TOKENS - len(tokens)
    return DummyChunk(
        [id_start] + tokens + [id_end] * (missing + 1),
        [1.0] + weights + [1.0] * (missing + 1),
        before,
        len(concept),
    )


@dataclass(frozen=True)
class SplicedChunk:
    """The chunk's new rows; where each span's concept rows landed: ``placed[span]`` = (row in the chunk, index into
    the span's concept rows), for the rows that fit."""

    rows: torch.Tensor
    dropped_concept_rows: int
    placed: dict[Span, list[tuple[int, int]]]


def _class_rows_for(rows: torch.Tensor, span: Span, count: int) -> torch.Tensor:
    """The span's class-word rows resampled to ``count`` rows (nearest), to blend against."""
    index = [span.start + min(j * span.length // max(count, 1), span.length - 1) for j in range(count)]
    return rows[index]


Origin = tuple[Span | None, int]
"""Where a row of a spliced chunk comes from: ``(None, row of p)`` or ``(span, index into the span's concept rows)``."""


def splice_order(chunk: Chunk, counts: Mapping[Span, int]) -> tuple[list[Origin], int]:
    """The origin of each of the 77 rows of ``chunk`` once each span of ``counts`` holds that many concept rows, and
    how many concept rows did not fit."""
    order: list[tuple[Span | None, int, bool]] = []  # (span, row, removable padding)
    starts = {span.start: span for span in counts}
    row = 0
    while row < CHUNK_ROWS:
        span = starts.get(row)
        if span is None:
            order.append((None, row, chunk.tags[row] == PAD))
            row += 1
            continue
        order += [(span, j, False) for j in range(counts[span])]
        row += span.length

    dropped = 0
    while len(order) > CHUNK_ROWS:
        pads = [i for i, (_, _, removable) in enumerate(order) if removable]
        if pads:
            del order[pads[-1]]
            continue
        last_concept = max(i for i, (span, _, _) in enumerate(order) if span is not None)
        del order[last_concept]
        dropped += 1
    order += [order[-1]] * (CHUNK_ROWS - len(order))
    return [(span, j) for span, j, _ in order], dropped


def splice_chunk(
    rows: torch.Tensor, chunk: Chunk, concept_rows: dict[Span, torch.Tensor], strengths: Sequence[float] = ()
) -> SplicedChunk:
    """Replace each span's rows of ``rows`` (77 x C, p's encoding of ``chunk``) by its concept rows.

    Spans missing from ``concept_rows`` keep p's rows. ``strengths[concept]`` < 1 blends towards the class word's rows.
    """
    blocks: list[torch.Tensor] = [rows]
    offsets: dict[Span | None, int] = {None: 0}
    start = len(rows)
    for span, concept in concept_rows.items():
        concept = concept.to(rows)
        strength = strengths[span.concept] if span.concept < len(strengths) else 1.0
        if strength != 1.0 and len(concept):
            concept = torch.lerp(_class_rows_for(rows, span, len(concept)), concept, strength)
        blocks.append(concept)
        offsets[span] = start
        start += len(concept)
    order, dropped = splice_order(chunk, {span: len(concept) for span, concept in concept_rows.items()})
    index = torch.tensor([offsets[origin] + j for origin, j in order], device=rows.device)
    placed: dict[Span, list[tuple[int, int]]] = {span: [] for span in concept_rows}
    for position, (origin, j) in enumerate(order):
        if origin is not None:
            placed[origin].append((position, j))
    return SplicedChunk(torch.cat(blocks).index_select(0, index), dropped, placed)
