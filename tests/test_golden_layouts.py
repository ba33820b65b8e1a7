"""AlignIT's layout against the layouts real WebUIs computed (``tests/golden``, recorded by ``tools/record_layouts.py``
with the WebUI's own ``tokenize_line`` and prompt parser): tokens, multipliers and embedding fixes of every chunk,
for every recorded WebUI, model family, text encoder and setting.

Each recorded text is one schedule entry of one AND part of a corpus prompt, as the WebUI's prompt parser split
AlignIT's marked rewrite of it; AlignIT lays out the marked text, the WebUI laid out its plain text.
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import pytest
import torch
from golden_layouts import FILES, Layout, RecordedVocabulary, layouts, load

from alignit.engine import check_same_layout
from alignit.errors import LayoutMismatch
from alignit.layout import Chunk, EmbeddingMatch, LayoutOptions, layout_prompt

pytestmark = pytest.mark.skipif(not FILES, reason="no golden layouts recorded")
ALL = [layout for path in FILES for layout in layouts(path)]


class GoldenTokenizer(RecordedVocabulary):
    """``alignit.layout.Tokenizer`` over the recorded vocabulary; an embedding's handle is its name."""

    def find_embedding(self, tokens, position):
        found = self.find_name(tokens, position)
        if found is None:
            return None
        name, length = found
        return EmbeddingMatch(self.embeddings[name], length, name)


@cache
def _tokenizer(file: str) -> GoldenTokenizer:
    return GoldenTokenizer(_data(file))


def _data(file: str) -> dict:
    return load(next(p for p in FILES if p.stem == file))


def _ours(layout: Layout) -> list[Chunk]:
    options = LayoutOptions(parse_emphasis=layout.emphasis != "None", comma_backtrack=layout.backtrack)
    return layout_prompt(layout.marked, _tokenizer(layout.file), options)


def _as_recorded(chunks: list[Chunk]) -> list[dict]:
    return [{"tokens": c.tokens, "multipliers": c.multipliers, "fixes": [tuple(f) for f in c.fixes]} for c in chunks]


def test_the_corpus_is_recorded_for_each_webui_and_family():
    recorded = {(load(p)["webui"], load(p)["family"]): len(load(p)["cases"]) for p in FILES}
    assert recorded and all(count >= 150 for count in recorded.values()), recorded


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_markers_do_not_change_the_webui_parse(path):
    """The WebUI's prompt parser splits AlignIT's marked prompt as it splits the plain one (AND, editing, alternation)."""
    assert [case["id"] for case in load(path)["cases"] if not case["plain_parse_agrees"]] == []


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_bpe_vocabulary_agrees_with_the_webui_tokenizer_on_ascii(path):
    """The recorded answers only stand in for what ftfy rewrites: every ASCII text without '&' tokenizes alike."""
    data = load(path)
    for encoder in data["encoders"]:
        vocabulary = RecordedVocabulary(data, encoder)
        differs = [text for text, ids in vocabulary.recorded.items() if vocabulary.bpe_tokens(text) != ids]
        assert all(not text.isascii() or "&" in text for text in differs), differs


@pytest.mark.parametrize("layout", ALL, ids=[layout.id for layout in ALL])
def test_alignit_lays_out_as_the_webui(layout):
    ours = _as_recorded(_ours(layout))
    first = layout.chunks["clip_l"]
    assert len(ours) == len(first), f"{len(ours)} chunks, the WebUI made {len(first)}"
    for i, (mine, theirs) in enumerate(zip(ours, first)):
        assert mine["tokens"] == theirs["tokens"], f"chunk {i}: tokens"
        assert mine["multipliers"] == theirs["multipliers"], f"chunk {i}: multipliers"
        assert mine["fixes"] == theirs["fixes"], f"chunk {i}: embedding fixes"


@pytest.mark.parametrize("layout", ALL, ids=[layout.id for layout in ALL])
def test_the_host_check_accepts_exactly_the_webui_layouts(layout):
    """``check_same_layout`` passes when every text encoder laid the text out as AlignIT did, and refuses (AlignIT steps
    aside for the prompt) when the model's encoders disagree among themselves (A1111 SDXL: OpenCLIP's own tokenizer)."""
    ours = _ours(layout)
    host = [
        [
            SimpleNamespace(
                tokens=c["tokens"], multipliers=c["multipliers"], fixes=[SimpleNamespace(offset=o) for o, _ in c["fixes"]]
            )
            for c in chunks
        ]
        for chunks in layout.chunks.values()
    ]
    if all(chunks == layout.chunks["clip_l"] for chunks in layout.chunks.values()):
        check_same_layout(layout.plain, ours, host)
    else:
        with pytest.raises(LayoutMismatch):
            check_same_layout(layout.plain, ours, host)


@pytest.mark.parametrize("layout", [x for x in ALL if "concepts" in x.case], ids=lambda x: x.id)
def test_class_word_spans_hold_the_class_words(layout):
    """Every class-word occurrence is tagged on its own tokens, whole or split over two chunks."""
    tokenizer = _tokenizer(layout.file)
    chunks = _ours(layout)
    found: dict[tuple[int, int], list[int]] = {}
    for chunk in chunks:
        for span in chunk.spans:
            found.setdefault((span.concept, span.occurrence), []).extend(chunk.tokens[span.start : span.start + span.length])
    for (concept, _), tokens in found.items():
        word = layout.case["concepts"][concept][1]
        (alone,) = layout_prompt(word, tokenizer)
        assert tokens == alone.tokens[1 : 1 + alone.tags[1:-1].count(None)], f"the spans of '{word}'"


def _contract_clip(layout: Layout, monkeypatch):
    """The contract's text encoder of the recorded WebUI (tests/contract), over the recorded vocabulary."""
    from backend.text_processing import emphasis
    from backend.text_processing.classic_engine import ClassicTextProcessingEngine
    from modules import sd_hijack, sd_hijack_clip, shared

    data = _data(layout.file)
    vocabulary = _tokenizer(layout.file)
    if data["webui"] == "forge":
        clip = ClassicTextProcessingEngine(None, vocabulary)
        clip.emphasis = emphasis.get_current_option(layout.emphasis)()
        database = clip.embeddings
    else:
        database = sd_hijack.EmbeddingDatabase()
        clip = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(None, vocabulary, SimpleNamespace(embedding_db=database))
        monkeypatch.setattr(shared.opts, "emphasis", layout.emphasis)
        monkeypatch.setattr(shared.opts, "comma_padding_backtrack", layout.backtrack)
    for name, vectors in data["embeddings"].items():
        database.register_embedding(sd_hijack.Embedding(torch.zeros(vectors, 1), name), vocabulary.tokenize([name])[0])
    return clip


@pytest.mark.parametrize("layout", ALL, ids=[layout.id for layout in ALL])
def test_the_contract_lays_out_as_the_webui(layout, monkeypatch):
    """The contract's ``tokenize_line`` (the CI stand-in for the WebUI's) is held to the real one."""
    chunks, _ = _contract_clip(layout, monkeypatch).tokenize_line(layout.plain)
    mine = [
        {"tokens": c.tokens, "multipliers": c.multipliers, "fixes": [(f.offset, f.embedding.name) for f in c.fixes]}
        for c in chunks
    ]
    assert mine == layout.chunks["clip_l"]
