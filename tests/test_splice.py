"""Exactness of the splice with a CLIP text model (small config, real vocabulary), encoded the A1111 way."""

import pytest
import torch

from alignit.concepts import Concept, Options
from alignit.engine import ConceptSource, Splicer
from alignit.layout import layout_prompt
from alignit.prompt import rewrite_prompt

BOS, EOS, PLACEHOLDER = 49406, 49407, 265  # 265: "*</w>"


def run(encoder, prompt, concepts, sources, **options):
    rewrite = rewrite_prompt(prompt, concepts)
    base = encoder.encode_prompt(rewrite.plain)
    splicer = Splicer(encoder, sources, Options(concepts=tuple(concepts), **options))
    return rewrite, base, splicer.splice(rewrite.marked, base)


def dummy(encoder, before, vectors, after, content_weights=None, weight=1.0):
    """p' written out by hand: BOS, placeholders, the concept, placeholders, EOS padding."""
    n = vectors.shape[0]
    tokens = [BOS] + [PLACEHOLDER] * before + [0] * n + [PLACEHOLDER] * after
    tokens += [EOS] * (77 - len(tokens))
    weights = [1.0] * 77
    for row in range(before + 1, before + 1 + n):
        weights[row] = weight
    with torch.no_grad():
        return encoder.encode_chunk(tokens, weights, [(before, vectors)])[before + 1 : before + 1 + n]


def test_multi_vector_embedding_one_token_class_word(encoder, vectors):
    emb = vectors(3)
    concept = Concept("<sks>", "cat")
    _, base, out = run(
        encoder, "a photo of <sks> playing badminton in a garden", [concept], [ConceptSource.embedding("sks", 3, emb)]
    )
    assert out.shape == base.shape == (77, 32)
    assert torch.equal(out[:4], base[:4])  # BOS, a, photo, of
    assert torch.equal(out[4:7], dummy(encoder, 3, emb, 5))  # concept rows = customized encoding of p'
    assert torch.equal(out[7:12], base[5:10])  # playing badminton in a garden
    assert torch.equal(out[12:76], base[10:74])  # padding, two rows fewer, taken nearest the final EOS
    assert torch.equal(out[76], base[76])


def test_one_vector_multi_token_class_word(encoder, vectors):
    emb = vectors(1)
    concept = Concept("<sks>", "golden retriever")
    _, base, out = run(encoder, "a <sks> on a sofa", [concept], [ConceptSource.embedding("sks", 1, emb)])
    assert torch.equal(out[:2], base[:2])
    assert torch.equal(out[2:3], dummy(encoder, 1, emb, 3))
    assert torch.equal(out[3:75], base[4:76])
    assert torch.equal(out[75], base[76]) and torch.equal(out[76], base[76])  # the final row fills the gap


def test_equal_lengths_touch_only_the_concept_rows(encoder, vectors):
    emb = vectors(1)
    _, base, out = run(encoder, "a <sks> playing badminton", [Concept("<sks>", "cat")], [ConceptSource.embedding("sks", 1, emb)])
    changed = (out != base).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2]
    assert torch.equal(out[2:3], dummy(encoder, 1, emb, 2))


def test_trigger_in_second_chunk(encoder, vectors):
    emb = vectors(2)
    prompt = "photo " * 80 + "of <sks> in a garden"
    _, base, out = run(encoder, prompt, [Concept("<sks>", "cat")], [ConceptSource.embedding("sks", 2, emb)])
    assert out.shape == base.shape == (154, 32)
    assert torch.equal(out[:77], base[:77])
    second_base, second = base[77:], out[77:]
    # chunk 2: photo x5, of, concept(2), in a garden
    assert torch.equal(second[:7], second_base[:7])
    assert torch.equal(second[7:9], dummy(encoder, 6, emb, 3))
    assert torch.equal(second[9:12], second_base[8:11])
    assert torch.equal(second[12:76], second_base[11:75])


def test_emphasis_scales_concept_rows(encoder, vectors):
    emb = vectors(2)
    concept, source = Concept("<sks>", "cat"), ConceptSource.embedding("sks", 2, emb)
    encoder.emphasis = "No norm"
    _, _, plain = run(encoder, "a <sks> on a sofa", [concept], [source])
    _, base, weighted = run(encoder, "a (<sks>:1.5) on a sofa", [concept], [source])
    assert torch.equal(weighted[2:4], plain[2:4] * 1.5)
    assert torch.equal(weighted[4:7], base[3:6])
    encoder.emphasis = "Original"
    _, _, original = run(encoder, "a (<sks>:1.5) on a sofa", [concept], [source])
    assert torch.equal(original[2:4], dummy(encoder, 1, emb, 3, weight=1.5))


def test_two_concepts_and_a_plain_embedding(encoder, vectors):
    cat, dog, style = vectors(2, seed=1), vectors(1, seed=2), vectors(3, seed=3)
    encoder.add_embedding("stylish", style)
    concepts = [Concept("<sks>", "cat"), Concept("<zwx>", "dog")]
    sources = [ConceptSource.embedding("sks", 2, cat), ConceptSource.embedding("zwx", 1, dog)]
    _, base, out = run(encoder, "<sks> and <zwx> stylish", concepts, sources)
    # plain: BOS cat and dog stylish(3) EOS...  spliced: BOS cat'(2) and dog'(1) stylish(3)
    assert torch.equal(out[1:3], dummy(encoder, 0, cat, 5))
    assert torch.equal(out[3], base[2])
    assert torch.equal(out[4:5], dummy(encoder, 2, dog, 3))
    assert torch.equal(out[5:8], base[4:7])  # the plain embedding keeps its own rows from p
    assert torch.equal(out[8:76], base[7:75])


def test_strength_blends_towards_the_class_word(encoder, vectors):
    emb = vectors(1)
    source = ConceptSource.embedding("sks", 1, emb)
    _, base, none = run(encoder, "a <sks>", [Concept("<sks>", "cat", strength=0.0)], [source])
    _, _, full = run(encoder, "a <sks>", [Concept("<sks>", "cat", strength=1.0)], [source])
    _, _, half = run(encoder, "a <sks>", [Concept("<sks>", "cat", strength=0.5)], [source])
    assert torch.equal(none, base)
    assert torch.equal(half[2], torch.lerp(base[2], full[2], 0.5))


def test_concept_split_across_chunks_keeps_every_chunk_77_rows(encoder, vectors):
    emb = vectors(2)
    concept = Concept("<sks>", "golden retriever")
    _, base, out = run(encoder, "a " * 74 + "<sks> runs", [concept], [ConceptSource.embedding("sks", 2, emb)])
    assert out.shape == base.shape == (154, 32)
    assert torch.equal(out[:75], base[:75])
    assert torch.equal(out[75:76], dummy(encoder, 74, emb, 0)[:1])  # one slot left in chunk 1
    assert torch.equal(out[76], base[76])
    assert torch.equal(out[77], base[77]) and torch.equal(out[78:153], base[79:154])  # 'retriever' row given up


def test_placeholders_before_the_concept_matter_after_it_do_not(encoder, vectors):
    """Causal attention: the concept rows depend on the tokens before it only (emphasis 'No norm': no mean)."""
    emb = vectors(2)
    encoder.emphasis = "No norm"
    concept, source = Concept("<sks>", "cat"), ConceptSource.embedding("sks", 2, emb)
    _, _, short = run(encoder, "a <sks>", [concept], [source])
    _, _, long = run(encoder, "a <sks> " + "playing " * 30, [concept], [source])
    _, _, moved = run(encoder, "a a <sks>", [concept], [source])
    assert torch.allclose(short[2:4], long[2:4], atol=1e-6)
    assert not torch.allclose(short[2:4], moved[3:5], atol=1e-3)


def test_layout_check_rejects_a_foreign_layout(encoder):
    from alignit.errors import LayoutMismatch

    chunks = layout_prompt("a cat", encoder)
    with pytest.raises(LayoutMismatch):
        encoder.check_layout("a dog", chunks)
