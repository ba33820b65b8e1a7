"""Class-word suggestions: candidate words ranked by how close their cross-attention keys are to the concept's, at
the position where the class word will stand.

Every word and the concept go through the same dummy prompt, the p' AlignIT encodes for "a photo of a <class word>":
``* * * * x`` (four placeholders, then x), with x's token ids for a word and the concept's own tokens, embedding
vectors and text-encoder patch for the concept, encoded by the host's text encoder. Because CLIP attends causally,
x's rows depend on the placeholders before it only, so nothing after x matters. With r̄(x) the mean of the rows x
occupies (a word of several tokens, a concept of several vectors) and K_l the key projection of cross-attention
layer l (l = 1..L, every such layer of the UNet)::

    score(w) = 1/L · Σ_l cos(K_l^c · r̄(c) − μ_l, K_l · r̄(w) − μ_l),    μ_l = 1/N · Σ_v K_l · r̄(v)

where K_l^c is the concept's own key weight (K_l for an embedding, K_l + ΔK_l for a LoRA's layers, Custom Diffusion's
fine-tuned K_l,cd for its) and μ_l the mean key of the N candidates. Keys are linear in the rows, so the mean of a
span's keys is the key of its mean row. Every candidate's row shares the same context (the placeholders before it,
the position), which gives all keys a large common part: uncentred, every cosine is close to 1 and the ranking rests
on small differences; centred on the candidates' mean, a score says how much the concept's key points where the
word's own departs from the others (1: the same direction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .concepts import Options, plain_words
from .engine import ConceptSource, Splicer, TextEncoder
from .errors import ConceptError
from .kv import Key, Project, Replacement
from .layout import CHUNK_ROWS, CHUNK_TOKENS, PAD, Chunk, Span, Tag
from .splice import dummy_chunk

WORDS_FILE = Path(__file__).with_name("class_words.txt")
PREFIX = 4
"""Placeholders before the class word: its position in "a photo of a <class word>"."""
BATCH = 32
"""Candidate chunks encoded at once."""


class BatchEncoder(TextEncoder, Protocol):
    """A text encoder that also encodes several chunks in one call (the WebUIs' ``process_tokens`` do)."""

    def encode_chunks(
        self, tokens: Sequence[Sequence[int]], multipliers: Sequence[Sequence[float]], fixes: Sequence[Sequence[tuple[int, Any]]]
    ) -> torch.Tensor:
        """B chunks of 77 tokens → B x 77 x C rows."""
        ...


@dataclass(frozen=True)
class Suggestion:
    word: str
    score: float


def read_words(text: str) -> list[str]:
    """The words of a word list: one per line, ``#`` starts a comment; blanks, repeats (any case) and words that cannot
    be a class word (prompt syntax) are left out."""
    words: dict[str, str] = {}
    for line in text.splitlines():
        word = " ".join(line.split("#", 1)[0].split())
        if word and plain_words(word):
            words.setdefault(word.lower(), word)
    return list(words.values())


def candidate_words(extra: Path | None = None) -> list[str]:
    """The shipped candidates, then those of ``extra`` (a user's word list; ConceptError when it cannot be read)."""
    words = read_words(WORDS_FILE.read_text(encoding="utf-8"))
    if extra is not None:
        try:
            words += read_words(extra.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ConceptError(f"the class-word list {extra} cannot be read: {error}") from None
    return read_words("\n".join(words))


def template(encoder: TextEncoder, placeholder: int) -> tuple[Chunk, Span]:
    """The chunk of "a photo of a <class word>" as the layout sees it, placeholders for its words: the class word
    (one slot) at row ``PREFIX + 1``, padding after it."""
    rest = CHUNK_TOKENS - PREFIX - 1
    tags: list[Tag] = [None] * (PREFIX + 1) + [(0, 0)] + [PAD] * rest + [None]
    tokens = [encoder.id_start] + [placeholder] * (PREFIX + 1) + [encoder.id_end] * (rest + 1)
    span = Span(0, 0, PREFIX + 1, 1)
    return Chunk(tokens, [1.0] * CHUNK_ROWS, [], tags, [span]), span


def concept_row(splicer: Splicer) -> torch.Tensor:
    """r̄ of the splicer's one concept: the mean of its rows in p', encoded as AlignIT encodes a concept's p'."""
    chunk, span = template(splicer.encoder, splicer.placeholder_id)
    return splicer.concept_rows(chunk, span).float().mean(0)


def word_rows(encoder: BatchEncoder, words: Sequence[str], placeholder: int) -> torch.Tensor:
    """r̄ of each word (N x C), the words' dummy prompts encoded ``BATCH`` at a time."""
    chunk, span = template(encoder, placeholder)
    dummies = [dummy_chunk(chunk, span, ids, placeholder) for ids in encoder.tokenize(list(words))]
    rows = []
    with torch.no_grad():
        for start in range(0, len(dummies), BATCH):
            batch = dummies[start : start + BATCH]
            encoded = encoder.encode_chunks([d.tokens for d in batch], [d.multipliers for d in batch], [[] for _ in batch])
            rows += [encoded[i, d.rows].float().mean(0) for i, d in enumerate(batch)]
    return torch.stack(rows)


def scores(
    concept: torch.Tensor, source: ConceptSource, words: torch.Tensor, layers: Iterable[Key], project: Project
) -> torch.Tensor:
    """The score of each word (one per row of ``words``) against the concept's row, over the key ``layers``, centred
    on the words' mean key; ``project`` is the host's own projection of rows by a layer (K_l·x)."""
    total = torch.zeros(len(words))
    count = 0
    with torch.no_grad():
        for key in layers:
            own = source.kv.get(key)
            if isinstance(own, Replacement):
                concept_key = F.linear(concept, own.weight.to(concept))
            else:
                concept_key = project(key, concept[None])[0].float()
                if own is not None:
                    concept_key = concept_key + own.delta(concept).float()
            word_keys = project(key, words).float()
            mean = word_keys.mean(0)
            total += F.cosine_similarity(word_keys - mean, (concept_key.to(word_keys) - mean)[None], dim=-1).cpu()
            count += 1
    if not count:
        raise ConceptError("this UNet has no cross-attention layer to compare keys in")
    return total / count


def rank(words: Sequence[str], word_scores: torch.Tensor, top: int, exclude: str = "") -> list[Suggestion]:
    """The ``top`` best words, best first (``exclude``, the trigger, is never one: a class word must differ from it)."""
    order = torch.argsort(word_scores, descending=True, stable=True).tolist()
    ranked = [Suggestion(words[i], round(float(word_scores[i]), 4)) for i in order if words[i].lower() != exclude.lower()]
    return ranked[:top]


@dataclass
class WordKeysCache:
    """The candidates' r̄ for one text encoder and word list (computing them costs one chunk per word)."""

    key: Any = None
    rows: torch.Tensor | None = None

    def rows_for(self, key: Any, encoder: BatchEncoder, words: Sequence[str], placeholder: int) -> torch.Tensor:
        if self.rows is None or self.key != key:
            self.rows, self.key = word_rows(encoder, words, placeholder), key
        return self.rows

    def clear(self) -> None:
        self.key, self.rows = None, None


def suggest(
    encoder: BatchEncoder,
    source: ConceptSource,
    options: Options,
    words: Sequence[str],
    layers: Mapping[Key, Any],
    project: Project,
    *,
    top: int = 5,
    exclude: str = "",
    cache: WordKeysCache | None = None,
    cache_key: Any = None,
) -> list[Suggestion]:
    """Rank ``words`` as class words for the concept of ``source`` (see the module's formula); ``layers``: the UNet's
    cross-attention projections by (layer, "k" | "v"), of which the keys are compared."""
    if not words:
        raise ConceptError("the class-word list is empty")
    splicer = Splicer(encoder, [source], options)
    with torch.no_grad():
        concept = concept_row(splicer)
        placeholder = splicer.placeholder_id
        rows = (cache or WordKeysCache()).rows_for((cache_key, placeholder, tuple(words)), encoder, words, placeholder)
        keys = sorted(key for key in layers if key[1] == "k")
        return rank(words, scores(concept, source, rows, keys, project), top, exclude)
