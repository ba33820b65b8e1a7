"""The golden layouts recorded from real WebUIs by ``tools/record_layouts.py`` (``tests/golden/layouts_*.json``) and a
tokenizer that answers as the recorded WebUI's did, for the tests that compare a layout with them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from clip_parts import clip_tokenizer

GOLDEN = Path(__file__).resolve().parent / "golden"
FILES = sorted(GOLDEN.glob("layouts_*.json"))


@cache
def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Layout:
    """One text laid out under one setting: the WebUI's chunks per text encoder (``tokens``, ``multipliers``,
    ``fixes`` as (offset, embedding name))."""

    file: str
    case: dict
    marked: str
    plain: str
    emphasis: str
    backtrack: int
    chunks: dict[str, list[dict]]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.case['id']}:{self.emphasis}/{self.backtrack}:{self.marked[:20]!r}"


def expand(chunk: dict) -> dict:
    """A recorded chunk with its multiplier runs written out."""
    multipliers = [value for value, count in chunk["multipliers"] for _ in range(count)]
    return {"tokens": chunk["tokens"], "multipliers": multipliers, "fixes": [tuple(fix) for fix in chunk["fixes"]]}


def layouts(path: Path) -> Iterator[Layout]:
    for case in load(path)["cases"]:
        for text in case["texts"]:
            for (emphasis, backtrack), encoders in zip(case["settings"], text["layouts"]):
                chunks = {name: [expand(c) for c in chunks] for name, chunks in encoders.items()}
                plain = text.get("plain", text["marked"])
                yield Layout(path.stem, case, text["marked"], plain, emphasis, backtrack, chunks)


class RecordedVocabulary:
    """The tokenizer side of a recorded WebUI's first text encoder (the one AlignIT lays out with): the real CLIP BPE
    vocabulary (``clip_parts``), except for the texts the WebUI tokenized while recording, which get the WebUI's
    answer (the WebUIs run ftfy, which this environment lacks: it rewrites curly quotes, ligatures, full-width
    letters and HTML entities before the BPE); the test embeddings are found by their names' tokens, longest first,
    as the WebUI's ``EmbeddingDatabase`` finds them. Callable like a transformers tokenizer."""

    def __init__(self, data: dict, encoder: str = "clip_l"):
        self.bpe = clip_tokenizer()
        self.recorded: dict[str, list[int]] = data["tokenizer"][encoder]
        self.bos_token_id = self.id_start = self.bpe.bos_token_id
        self.eos_token_id = self.id_end = self.bpe.eos_token_id
        self._vocab = self.bpe.get_vocab()
        self.comma_token = self._vocab[",</w>"]
        self.embeddings: dict[str, int] = data["embeddings"]
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.embeddings:
            ids = self.tokenize([name])[0]
            self._lookup.setdefault(ids[0], []).append((ids, name))
        for entries in self._lookup.values():
            entries.sort(key=lambda entry: -len(entry[0]))

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def __call__(self, texts: Sequence[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": self.tokenize(texts)}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.recorded[text] if text in self.recorded else self.bpe_tokens(text) for text in texts]

    def bpe_tokens(self, text: str) -> list[int]:
        return self.bpe(text, add_special_tokens=False)["input_ids"]

    def find_name(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """The embedding whose name's tokens start at ``position``: (name, name length in tokens)."""
        for ids, name in self._lookup.get(tokens[position], []):
            if list(tokens[position : position + len(ids)]) == ids:
                return name, len(ids)
        return None
