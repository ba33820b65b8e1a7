"""Layout of prompts with the real CLIP vocabulary, as A1111's tokenize_line lays them out."""

from alignit.concepts import Concept
from alignit.layout import CHUNK_ROWS, PAD, EmbeddingMatch, LayoutOptions, Span, layout_prompt
from alignit.prompt import rewrite_prompt

BOS, EOS, A, PHOTO, OF, CAT, COMMA = 49406, 49407, 320, 1125, 539, 2368, 267
CONCEPT = Concept("<sks>", "cat")


def marked(prompt, concepts=(CONCEPT,)):
    return rewrite_prompt(prompt, list(concepts)).marked


def test_single_chunk(encoder):
    (chunk,) = layout_prompt(marked("a photo of <sks>"), encoder)
    assert chunk.tokens == [BOS, A, PHOTO, OF, CAT] + [EOS] * 72
    assert chunk.multipliers == [1.0] * CHUNK_ROWS
    assert chunk.spans == [Span(0, 0, 4, 1)]
    assert chunk.tags[5:76] == [PAD] * 71


def test_break_and_weights(encoder):
    first, second = layout_prompt(marked("a photo BREAK (<sks>:1.5) of"), encoder)
    assert first.tokens[:4] == [BOS, A, PHOTO, EOS] and first.spans == []
    assert second.tokens[:4] == [BOS, CAT, OF, EOS]
    assert second.multipliers[:3] == [1.0, 1.5, 1.0]
    assert second.spans == [Span(0, 0, 1, 1)]


def test_emphasis_off_keeps_brackets_as_text(encoder):
    (chunk,) = layout_prompt(marked("(<sks>:1.5)"), encoder, LayoutOptions(parse_emphasis=False))
    assert chunk.tokens[1] == encoder.tokenize(["("])[0][0]
    assert chunk.multipliers == [1.0] * CHUNK_ROWS
    assert chunk.spans == [Span(0, 0, 2, 1)]


def test_second_chunk_and_comma_backtrack(encoder):
    text = "a " * 70 + ", photo photo photo photo photo <sks>"
    first, second = layout_prompt(marked(text), encoder)
    # 70 + comma = 71 tokens; the next 5 would cross 75, so A1111 moves what follows the comma to chunk 2.
    assert first.tokens[71] == COMMA and first.tokens[72:] == [EOS] * 5
    assert second.tokens[:8] == [BOS] + [PHOTO] * 5 + [CAT, EOS]
    assert second.spans == [Span(0, 0, 6, 1)]
    no_backtrack = layout_prompt(marked(text), encoder, LayoutOptions(comma_backtrack=0))
    assert no_backtrack[1].spans == [Span(0, 0, 2, 1)]


def test_class_word_split_across_chunks(encoder):
    concept = Concept("<sks>", "golden retriever")
    first, second = layout_prompt(marked("a " * 74 + "<sks>", [concept]), encoder)
    assert first.spans == [Span(0, 0, 75, 1, part=0)]
    assert second.spans == [Span(0, 0, 1, 1, part=1)]


def test_embedding_moves_whole_to_next_chunk(encoder, vectors):
    encoder.add_embedding("stylish", vectors(4))
    first, second = layout_prompt(marked("a " * 73 + "stylish <sks>"), encoder)
    assert first.tokens[74:] == [EOS] * 3
    assert second.fixes[0][0] == 0 and second.tokens[1:5] == [0] * 4
    assert second.spans == [Span(0, 0, 5, 1)]


def test_fake_tokenizer_contract():
    """The layout only needs ids, tokenize and find_embedding."""

    class Words:
        id_start, id_end, comma_token = 1, 2, 3

        def tokenize(self, texts):
            return [[10 + len(word) for word in text.split()] for text in texts]

        def find_embedding(self, tokens, position):
            return EmbeddingMatch(3, 1, "E") if tokens[position] == 99 else None

    (chunk,) = layout_prompt(marked("x yy <sks>"), Words())
    assert chunk.tokens[:5] == [1, 11, 12, 13, 2] and chunk.spans == [Span(0, 0, 3, 1)]
