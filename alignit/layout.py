"""Where each token of a prompt lands: 77-row chunks, as the WebUI lays them out, with the class words tagged.

Same algorithm as the WebUI's ``tokenize_line`` (A1111 ``modules/sd_hijack_clip.py``, Forge's classic engine):
75 tokens a chunk between BOS and EOS, EOS padding, ``BREAK``, comma backtracking, embeddings that move whole to
the next chunk. Hosts check the result against their own tokenizer before trusting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .prompt import split_marked
from .syntax import BREAK, parse_attention

CHUNK_TOKENS = 75
CHUNK_ROWS = CHUNK_TOKENS + 2


@dataclass(frozen=True)
class EmbeddingMatch:
    """An embedding found in the token stream: ``handle`` is what the host needs to insert its vectors."""

    vectors: int
    length_in_tokens: int
    handle: Any


class Tokenizer(Protocol):
    """What the layout needs from a host's text encoder."""

    id_start: int
    id_end: int
    comma_token: int | None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def find_embedding(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None: ...


@dataclass(frozen=True)
class Span:
    """Rows ``start .. start+length`` of a chunk (row 0 is BOS) hold one class-word occurrence of a concept.

    ``part`` is 0 for the span that receives the concept rows; an occurrence split across a chunk boundary
    has a second part whose rows are given up.
    """

    concept: int
    occurrence: int
    start: int
    length: int
    part: int = 0


Tag = tuple[int, int] | str | None
"""Per row: ``(concept, occurrence)`` for a class-word token, ``"pad"`` for EOS padding, else None."""
PAD = "pad"


@dataclass
class Chunk:
    """One 77-row chunk: token ids and weights with BOS/EOS, embedding fixes (offset without BOS, handle), spans."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)


@dataclass(frozen=True)
class LayoutOptions:
    """The WebUI settings the layout depends on."""

    parse_emphasis: bool = True
    comma_backtrack: int = 20


def _tagged_fragments(text: str, parse_emphasis: bool) -> list[tuple[list[tuple[str, int | None]], float]]:
    """Attention fragments of a marked text, each split further at class-word insertions."""
    fragments = parse_attention(text) if parse_emphasis else [(text, 1.0)]
    return [
        (split_marked(fragment) if (fragment, weight) != BREAK else [(fragment, None)], weight) for fragment, weight in fragments
    ]


def layout_prompt(text: str, tokenizer: Tokenizer, options: LayoutOptions = LayoutOptions()) -> list[Chunk]:
    """Lay out one marked prompt (a single AND-part at a single schedule step) into chunks with class-word spans."""
    fragments = _tagged_fragments(text, options.parse_emphasis)
    pieces = [piece for parts, _ in fragments for piece, _ in parts]
    piece_tokens = iter(tokenizer.tokenize(pieces))

    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1
    occurrences: dict[int, int] = {}

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        missing = CHUNK_TOKENS - len(chunk.tokens)
        chunk.tokens = [tokenizer.id_start] + chunk.tokens + [tokenizer.id_end] * missing + [tokenizer.id_end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * (missing + 1)
        chunk.tags = [None] + chunk.tags + [PAD] * missing + [None]
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for parts, weight in fragments:
        tokens: list[int] = []
        tags: list[Tag] = []
        for _, concept in parts:
            ids = next(piece_tokens)
            tag = None
            if concept is not None:
                tag = (concept, occurrences.get(concept, 0))
                occurrences[concept] = tag[1] + 1
            tokens += ids
            tags += [tag] * len(ids)
        if (parts[0][0], weight) == BREAK:
            close_chunk()
            continue

        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == tokenizer.comma_token:
                last_comma = len(chunk.tokens)
            elif (
                options.comma_backtrack
                and len(chunk.tokens) == CHUNK_TOKENS
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= options.comma_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_multipliers, moved_tags = chunk.tokens[cut:], chunk.multipliers[cut:], chunk.tags[cut:]
                del chunk.tokens[cut:], chunk.multipliers[cut:], chunk.tags[cut:]
                close_chunk()
                chunk.tokens, chunk.multipliers, chunk.tags = moved_tokens, moved_multipliers, moved_tags

            if len(chunk.tokens) == CHUNK_TOKENS:
                close_chunk()

            match = tokenizer.find_embedding(tokens, position)
            if match is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                chunk.tags.append(tags[position])
                position += 1
                continue
            if len(chunk.tokens) + match.vectors > CHUNK_TOKENS:
                close_chunk()
            chunk.fixes.append((len(chunk.tokens), match.handle))
            chunk.tokens += [0] * match.vectors
            chunk.multipliers += [weight] * match.vectors
            chunk.tags += [tags[position]] * match.vectors
            position += match.length_in_tokens

    if chunk.tokens or not chunks:
        close_chunk()
    assign_spans(chunks)
    return chunks


def assign_spans(chunks: list[Chunk]) -> None:
    """Fill each chunk's ``spans`` from its ``tags``; an occurrence continued in a later chunk gets ``part`` 1 there.

    ``layout_prompt`` calls it; a host that lays prompts out with its own algorithm (ComfyUI's chunking is not the
    WebUI's) tags the rows itself and calls it."""
    for item in chunks:
        item.spans = _spans(item.tags)
    _number_parts(chunks)


def _spans(tags: list[Tag]) -> list[Span]:
    spans: list[Span] = []
    row = 0
    while row < len(tags):
        tag = tags[row]
        if isinstance(tag, tuple):
            end = row
            while end < len(tags) and tags[end] == tag:
                end += 1
            spans.append(Span(tag[0], tag[1], row, end - row))
            row = end
        else:
            row += 1
    return spans


def _number_parts(chunks: list[Chunk]) -> None:
    seen: set[tuple[int, int]] = set()
    for chunk in chunks:
        numbered = []
        for span in chunk.spans:
            key = (span.concept, span.occurrence)
            numbered.append(Span(span.concept, span.occurrence, span.start, span.length, int(key in seen)))
            seen.add(key)
        chunk.spans = numbered
