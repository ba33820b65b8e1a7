"""Where each class-word token of a prompt lands in ComfyUI's chunks.

ComfyUI lays a prompt out its own way (``comfy/sd1_clip.py`` ``SDTokenizer.tokenize_with_weights``): weight segments
``(word:1.2)``, pieces split at `` embedding:``, one token group per piece (an embedding: one entry per vector), a
group that does not fit a 77-token chunk moved whole to the next one unless it has 8 tokens or more, no comma
backtracking, no ``BREAK``. Its word ids number those groups, not words.

AlignIT reads the groups of the *marked* prompt with ComfyUI's own parser functions, tokenizing the text between the
markers separately so that each class-word token carries its tag, and then puts each group's tokens where ComfyUI's
own tokenization of the plain prompt put the tokens of that group's word id. Every token must be the one ComfyUI has
there (same id or the same embedding vector, same weight) and every chunk must be start, the groups' tokens, end,
padding; anything else is a ``LayoutMismatch`` and the prompt is left as ComfyUI encodes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from comfy import sd1_clip

from ...errors import LayoutMismatch
from ...layout import CHUNK_ROWS, PAD, Chunk, Tag, assign_spans
from ...prompt import MARK_CLOSE, MARK_OPEN, split_marked, strip_markers

Tokens = dict[str, list[list[tuple[Any, float, int]]]]
"""``clip.tokenize(text, return_word_ids=True)``: per stream (``l``; ``g`` and ``l``), chunks of (token, weight, word id)."""

Group = list[tuple[Any, float, Tag]]


def word_tokens(tokenizer: Any, text: str) -> list[int]:
    """The ids ComfyUI gives a piece of text (sd1_clip.py 590: the tokenizer's output without start and end)."""
    end = -1 if tokenizer.tokenizer_adds_end_token else None
    return list(tokenizer.tokenizer(text)["input_ids"][tokenizer.tokens_start : end])


def _marked_group(tokenizer: Any, text: str, weight: float, occurrences: dict[int, int]) -> Group:
    group: Group = []
    for piece, concept in split_marked(text):
        tag: Tag = None
        if concept is not None:
            tag = (concept, occurrences.get(concept, 0))
            occurrences[concept] = tag[1] + 1
        group += [(token, weight, tag) for token in word_tokens(tokenizer, piece)]
    return group


def tagged_groups(tokenizer: Any, marked_text: str) -> list[Group]:
    """The token groups ``tokenize_with_weights`` makes of a marked text (sd1_clip.py 553-591), class words tagged."""
    identifier = tokenizer.embedding_identifier
    groups: list[Group] = []
    occurrences: dict[int, int] = {}
    for segment, weight in sd1_clip.token_weights(sd1_clip.escape_important(marked_text), 1.0):
        pieces = re.split(f" {identifier}|\n{identifier}", sd1_clip.unescape_important(segment))
        pieces = [pieces[0]] + [identifier + piece for piece in pieces[1:]]
        for word in [piece for piece in pieces if piece != ""]:
            if word.startswith(identifier) and tokenizer.embedding_directory is not None:
                name = word[len(identifier) :].strip("\n")
                first = (name.split(maxsplit=1) or [""])[0]
                if MARK_OPEN in first or MARK_CLOSE in first:
                    raise LayoutMismatch(f"a class word is part of an embedding name in '{strip_markers(marked_text)[:60]}'")
                embed, leftover = tokenizer._try_get_embedding(name)
                if embed is not None:
                    rows = [embed] if embed.ndim == 1 else list(embed)
                    groups.append([(row, weight, None) for row in rows])
                if leftover == "":
                    continue
                word = leftover
            groups.append(_marked_group(tokenizer, word, weight, occurrences))
    return groups


def _same(ours: Any, theirs: Any) -> bool:
    if torch.is_tensor(ours) or torch.is_tensor(theirs):
        return torch.is_tensor(ours) and torch.is_tensor(theirs) and ours.shape == theirs.shape and torch.equal(ours, theirs)
    return bool(ours == theirs)


def _chunk_tags(tokenizer: Any, groups: list[Group], chunks: Sequence[Sequence[Any]], text: str) -> list[list[Tag]]:
    """Per chunk, the tags of its content rows; LayoutMismatch unless ComfyUI's chunks hold exactly ``groups``."""
    placed = [0] * len(groups)
    tags: list[list[Tag]] = []

    def mismatch(why: str) -> LayoutMismatch:
        return LayoutMismatch(f"AlignIT lays out '{text[:60]}' differently from ComfyUI ({why})")

    for chunk in chunks:
        if len(chunk) != CHUNK_ROWS or chunk[0][0] != tokenizer.start_token:
            raise mismatch("a chunk that is not start, tokens, end, padding")
        content = 1
        while content < CHUNK_ROWS and chunk[content][2] > 0:
            content += 1
        rows: list[Tag] = []
        for token, weight, word in chunk[1:content]:
            if word > len(groups) or placed[word - 1] >= len(groups[word - 1]):
                raise mismatch(f"word {word}")
            ours, our_weight, tag = groups[word - 1][placed[word - 1]]
            if not _same(ours, token) or our_weight != weight:
                raise mismatch(f"a token of word {word}")
            placed[word - 1] += 1
            rows.append(tag)
        tail = [(token, weight, word) for token, weight, word in chunk[content:]]
        ends = [(tokenizer.end_token, 1.0, 0)] + [(tokenizer.pad_token, 1.0, 0)] * (len(tail) - 1)
        if not all(_same(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(tail, ends)) or not tail:
            raise mismatch("a chunk that is not start, tokens, end, padding")
        tags.append(rows)
    if placed != [len(group) for group in groups]:
        raise mismatch("tokens left over")
    return tags


def lay_out(streams: Mapping[str, Any], marked_text: str, tokens: Tokens) -> list[Chunk]:
    """The chunks of a marked prompt with its class-word spans, checked against ComfyUI's ``tokens`` of its plain text.

    ``streams``: the stream name → ComfyUI ``SDTokenizer`` (``l``; ``g`` and ``l``). The chunks' tokens are the first
    stream's with padding written as end tokens (the core's form; ``ComfyEncoder`` pads each stream its own way).
    """
    text = strip_markers(marked_text)
    per_stream = [_chunk_tags(streams[name], tagged_groups(streams[name], marked_text), tokens[name], text) for name in streams]
    if any(tags != per_stream[0] for tags in per_stream[1:]):
        raise LayoutMismatch(f"ComfyUI's text encoders lay out '{text[:60]}' differently from each other")
    first = streams[next(iter(streams))]
    chunks = []
    for chunk, tags in zip(tokens[next(iter(streams))], per_stream[0]):
        content = [0 if torch.is_tensor(token) else int(token) for token, _, _ in chunk[1 : 1 + len(tags)]]
        weights = [float(weight) for _, weight, _ in chunk[1 : 1 + len(tags)]]
        padding = CHUNK_ROWS - 2 - len(tags)
        chunks.append(
            Chunk(
                tokens=[first.start_token, *content] + [first.end_token] * (padding + 1),
                multipliers=[1.0, *weights] + [1.0] * (padding + 1),
                tags=[None, *tags] + [PAD] * padding + [None],
            )
        )
    assign_spans(chunks)
    return chunks
