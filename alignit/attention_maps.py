"""Per-word cross-attention maps as DAAM defines them (Tang et al., "What the DAAM", ACL 2023), host-free.

The map of a word in one image: at every recorded cross-attention layer and sampling step, the attention
probabilities ``softmax(q·kᵀ·scale)`` of the image's cond rows (never uncond), summed over heads and over the word's
tokens (every occurrence), reshaped to the layer's h×w, upsampled to the latent's size, summed over layers and steps;
normalised per word at the end (from its minimum to its maximum, as DAAM draws them).

Choices:
- DAAM upsamples bicubically and clamps at 0; here the upsampling is bilinear, which keeps maps ≥ 0 and is linear,
  so the sums are kept at each layer's resolution during sampling and upsampled once at the end (the same sum).
- Layers: those at 1/2 and 1/4 of the latent's resolution (``LEVELS``; SD1.5 at 512 px: the 32×32 and 16×16 ones).
  DAAM uses all; the full-resolution level costs the most and is the noisiest, the 8×8 middle block is too coarse to
  place a word (README, "Attention maps").
- The probabilities are recomputed from the layer's q and k, over slices of queries (at most ``SLICE_ELEMENTS``
  scores at a time), so any attention kernel may run the layer itself.

Which rows of a layer's context are which word is decided by value: a cond row of the context is matched, window by
window, against the conditioning the host planned for that image (``CondEntry``), whose columns name each word's
token rows. A context that repeats the conditioning (Forge tiles it to the LCM of cond and uncond lengths) counts
every copy; padding that is not the conditioning counts for nothing. No host-device synchronisation per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .concepts import Concept
from .layout import Chunk
from .prompt import EXTRA_NETWORK, Rewrite, rewrite_prompt, split_marked
from .splice import Origin

MAX_WORDS = 8
LEVELS = (2, 4)
"""Downsampling factors (latent size / layer size) of the layers whose attention is recorded."""
SLICE_ELEMENTS = 1 << 19
"""Attention scores computed at once (rows × heads × queries × tokens): 2 MiB in float32, twice that with softmax."""

STOP_WORDS = frozenset(
    """a an the and or but nor of in on at to into onto with without within for from by as is are was were be been
    being am it its this that these those there here some any very so than then too up down out over under above below
    near next behind while his her hers their theirs our ours your yours my mine him them she he they we you me us who
    whom whose which what where when why how has have had do does did not no can could will would shall should may
    might must just all each both about against between through during before after again off only own same such
    other more most few one""".split()
)
_WORD = re.compile(r"[^\W\d_]{2,}")
_SYNTAX_WORDS = frozenset({"AND", "BREAK"})


@dataclass(frozen=True)
class Word:
    """A word whose map is drawn: a literal word of the prompt, or a concept (its trigger, or its class word where
    AlignIT put it in the trigger's place)."""

    text: str
    concept: int | None = None

    def caption(self, concepts: Sequence[Concept], applied: Collection[int]) -> str:
        """The word as it stands in the prompt the model conditioned on."""
        if self.concept is None:
            return self.text
        concept = concepts[self.concept]
        return concept.class_word if self.concept in applied else concept.trigger


def _content_words(text: str, placeholder: str) -> list[str]:
    words, seen = [], set()
    for match in _WORD.finditer(EXTRA_NETWORK.sub(" ", text)):
        word = match.group(0)
        key = word.lower()
        if word in _SYNTAX_WORDS or key in STOP_WORDS or key == placeholder.strip().lower() or key in seen:
            continue
        seen.add(key)
        words.append(word)
    return words


def default_words(prompt: str, concepts: Sequence[Concept], placeholder: str, limit: int = MAX_WORDS) -> list[Word]:
    """Every concept the prompt names (in row order), then its other content words (no stop word, placeholder, trigger
    or class word), at most ``limit``. Every concept has a trigger."""
    rewrite = rewrite_prompt(prompt, concepts)
    named = [Word(concepts[i].class_word or concepts[i].trigger, i) for i, count in enumerate(rewrite.found) if count]
    taken = {concept.class_word.strip().lower() for concept in concepts}
    text = " ".join(piece for piece, concept in split_marked(rewrite.marked) if concept is None)
    literal = [Word(word) for word in _content_words(text, placeholder) if word.lower() not in taken]
    return (named + literal)[:limit]


def parse_words(text: str, concepts: Sequence[Concept], limit: int = MAX_WORDS) -> list[Word]:
    """The words a user names, comma-separated; a concept's trigger or class word names the concept."""
    words: list[Word] = []
    for item in text.split(","):
        name = " ".join(item.split())
        if not name:
            continue
        concept = next(
            (i for i, c in enumerate(concepts) if name.lower() in (c.trigger.strip().lower(), c.class_word.strip().lower())),
            None,
        )
        word = Word(name if concept is None else concepts[concept].class_word or concepts[concept].trigger, concept)
        if word not in words:
            words.append(word)
    return words[:limit]


def mark_words(prompt: str, concepts: Sequence[Concept], words: Sequence[Word], applied: Collection[int]) -> Rewrite:
    """``prompt`` with every occurrence of ``words[i]`` marked as ``i`` (as ``rewrite_prompt`` marks concepts), the
    triggers of the ``applied`` concepts replaced by their class words and every other trigger kept: ``plain`` is the
    text the model conditions on."""

    def stand_in(index: int) -> Concept:
        concept = concepts[index]
        return Concept(concept.trigger, concept.class_word if index in applied else concept.trigger)

    chosen = {word.concept for word in words if word.concept is not None}
    marked = [Concept(word.text, word.text) if word.concept is None else stand_in(word.concept) for word in words]
    others = [stand_in(i) for i in range(len(concepts)) if i not in chosen]
    return rewrite_prompt(prompt, marked + others)


def row_words(chunks: Sequence[Chunk], count: int) -> list[int | None]:
    """The word of each row of the conditioning of a text marked by ``mark_words`` (laid out into ``chunks``)."""
    return [tag[0] if isinstance(tag, tuple) and tag[0] < count else None for chunk in chunks for tag in chunk.tags]


def spliced_row_words(words: Sequence[int | None], origins: Sequence[Sequence[Origin]]) -> list[int | None]:
    """The word of each row once the chunks are spliced (``Splicer.row_origins``): a concept's rows belong to the word
    of the class word they replace."""
    out: list[int | None] = []
    for index, chunk in enumerate(origins):
        base = index * len(chunk)
        out += [words[base + (row if span is None else span.start)] for span, row in chunk]
    return out


def columns(words: Sequence[int | None], count: int) -> torch.Tensor:
    """(rows, count) with 1 where a row belongs to a word."""
    table = torch.zeros(len(words), count)
    for row, word in enumerate(words):
        if word is not None:
            table[row, word] = 1.0
    return table


@dataclass(frozen=True)
class CondEntry:
    """The conditioning one image's cond row may carry (one AND part at one schedule entry) and its word columns."""

    item: int
    rows: torch.Tensor  # (L, C), as the UNet receives it
    columns: torch.Tensor  # (L, words of the item)


@dataclass(frozen=True)
class CallColumns:
    """For one UNet call: its cond rows (batch indices) and, per cond row, the columns of every image's words."""

    rows: torch.Tensor  # (n,) long
    columns: torch.Tensor  # (n, context length, all words of the batch)


def layer_grid(latent: tuple[int, int], factor: int, queries: int) -> tuple[int, int] | None:
    """The h×w of a layer ``factor`` times smaller than the latent (each downsampling rounds up), if it has ``queries``."""
    height, width = latent
    for _ in range(int(math.log2(factor))):
        height, width = (height + 1) // 2, (width + 1) // 2
    return (height, width) if height * width == queries else None


class MapRecorder:
    """The maps of one batch: fed by a host with each recorded layer's q and k, read once the batch is sampled."""

    def __init__(self, words_per_item: Sequence[int], slice_elements: int = SLICE_ELEMENTS):
        self.counts = list(words_per_item)
        self.offsets = [sum(self.counts[:i]) for i in range(len(self.counts))]
        self.slots = sum(self.counts)
        self.slice_elements = slice_elements
        self.largest_slice = 0  # scores computed at once, at most (for the bench)
        self._entries: list[list[CondEntry]] = [[] for _ in self.counts]
        self._placed: dict[tuple[torch.device, torch.dtype], list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._sums: dict[tuple[int, int, int, int], torch.Tensor] = {}  # (latent h, w, layer h, w) → (slots, h·w)

    def set_entries(self, entries: Iterable[CondEntry]) -> None:
        """The conditioning of the pass about to be sampled (identical rows are kept once)."""
        self._entries = [[] for _ in self.counts]
        self._placed.clear()
        for entry in entries:
            known = self._entries[entry.item]
            if self.counts[entry.item] and not any(_same(entry.rows, other.rows) for other in known):
                known.append(entry)

    def _on(self, context: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        key = (context.device, context.dtype)
        if key not in self._placed:
            self._placed[key] = [
                [(entry.rows.to(context), entry.columns.to(context.device, torch.float32)) for entry in entries]
                for entries in self._entries
            ]
        return self._placed[key]

    def match(self, context: torch.Tensor, rows: Sequence[int], items: Sequence[int]) -> CallColumns | None:
        """Columns for the cond ``rows`` of a UNet call's context (``items``: the image of each); None if there are
        none to record."""
        pairs = [(row, item) for row, item in zip(rows, items) if 0 <= item < len(self.counts) and self.counts[item]]
        if not pairs:
            return None
        placed = self._on(context)
        length = context.shape[1]
        table = torch.zeros(len(pairs), length, self.slots, device=context.device)
        for n, (row, item) in enumerate(pairs):
            start, count = self.offsets[item], self.counts[item]
            for cond, word_columns in placed[item]:
                windows = length // len(cond)
                if windows == 0 or cond.shape[-1] != context.shape[-1]:
                    continue
                framed = context[row, : windows * len(cond)].reshape(windows, len(cond), -1)
                hit = (framed == cond).all(-1).all(-1).to(torch.float32)  # (windows,)
                table[n, : windows * len(cond), start : start + count] += (hit[:, None, None] * word_columns).reshape(-1, count)
        index = torch.tensor([row for row, _ in pairs], dtype=torch.long, device=context.device)
        return CallColumns(index, table)

    def add(
        self,
        call: CallColumns,
        q: torch.Tensor,
        k: torch.Tensor,
        heads: int,
        latent: tuple[int, int],
        grid: tuple[int, int],
    ) -> None:
        """Add one layer's attention: ``q`` (batch, h·w, heads·d) and ``k`` (batch, tokens, heads·d) as the layer
        computed them, for the call's cond rows."""
        with torch.no_grad():
            rows = call.rows.to(q.device)
            batch, queries, inner = len(rows), q.shape[1], q.shape[2]
            dim = inner // heads
            q_heads = q.index_select(0, rows).reshape(batch, queries, heads, dim).transpose(1, 2)
            k_heads = k.index_select(0, rows).float().reshape(batch, -1, heads, dim).permute(0, 2, 3, 1) * dim**-0.5
            tokens = k_heads.shape[-1]
            word_columns = call.columns.to(q.device)
            key = (*latent, *grid)
            total = self._sums.get(key)
            if total is None:
                total = self._sums[key] = torch.zeros(self.slots, queries, device=q.device)
            step = max(1, self.slice_elements // (batch * heads * tokens))
            self.largest_slice = max(self.largest_slice, batch * heads * min(step, queries) * tokens)
            for start in range(0, queries, step):
                scores = torch.matmul(q_heads[:, :, start : start + step].float(), k_heads)
                probabilities = scores.softmax(-1).sum(1)  # (batch, queries, tokens), summed over heads
                total[:, start : start + step] += torch.bmm(probabilities, word_columns).sum(0).T

    def maps(self) -> list[torch.Tensor]:
        """Per image, its words' maps (words, H, W) at the largest latent size seen (float32, on the CPU): the sums
        as defined, not normalised. Empty when nothing was recorded."""
        by_latent: dict[tuple[int, int], torch.Tensor] = {}
        for (height, width, h, w), total in self._sums.items():
            up = _resize(total.reshape(self.slots, h, w), (height, width))
            by_latent[(height, width)] = by_latent.get((height, width), 0) + up
        if not by_latent:
            return [torch.zeros(count, 0, 0) for count in self.counts]
        size = max(by_latent, key=lambda hw: hw[0] * hw[1])
        summed = sum(_resize(maps, size) for maps in by_latent.values())
        assert isinstance(summed, torch.Tensor)
        summed = summed.cpu()
        return [summed[start : start + count] for start, count in zip(self.offsets, self.counts)]

    def held_bytes(self) -> int:
        """Memory the recorder holds between layers: the sums and the conditioning it matches against."""
        tensors = list(self._sums.values()) + [t for entries in self._placed.values() for per in entries for e in per for t in e]
        return sum(t.numel() * t.element_size() for t in tensors)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b.to(a)))


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def normalised(maps: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> torch.Tensor:
    """Each word's map from its minimum to its maximum (or from ``low`` to ``high``, one value each per word) mapped to
    [0, 1], as DAAM draws them."""
    low = maps.amin(dim=(-2, -1)) if low is None else low
    high = maps.amax(dim=(-2, -1)) if high is None else high
    span = (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return ((maps - low[:, None, None]) / span[:, None, None]).clamp(0, 1)
