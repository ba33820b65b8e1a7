"""The A1111 glue (alignit.hosts.a1111) run in A1111's hook order against the contract in tests/contract."""

import pytest
import torch
from ldm_parts import small_unet
from modules import sd_hijack, shared  # the contract in tests/contract
from webui_flow import FakeModel, Processing, generate, script_args

from alignit.concepts import Concept, Options
from alignit.engine import ConceptSource, Splicer
from alignit.hosts.webui import flow
from alignit.prompt import rewrite_prompt

SKS = ["<sks>", "cat", "sks", 1.0]


@pytest.fixture(autouse=True)
def webui(text_model, tokenizer, vectors):
    shared.sd_model = FakeModel(text_model, tokenizer, small_unet())
    database = sd_hijack.EmbeddingDatabase()
    sd_hijack.model_hijack.embedding_db = database
    clip = shared.sd_model.cond_stage_model
    database.register_embedding(sd_hijack.Embedding(vectors(1), "sks"), clip.tokenize(["sks"])[0])
    database.register_embedding(sd_hijack.Embedding(vectors(3, seed=5), "lisa"), clip.tokenize(["lisa"])[0])
    Processing.cached_c, Processing.cached_uc, Processing.cached_hr_c = [None, None], [None, None], [None, None]
    yield shared.sd_model
    shared.opts.emphasis = "Original"


def expected_aligned(prompt, concepts, sources):
    """AlignIT's conditioning of one prompt text computed straight from the core, with the WebUI's encoder."""
    from alignit.hosts.webui.a1111 import A1111Encoder

    rewrite = rewrite_prompt(prompt, concepts)
    base = shared.sd_model.cond_stage_model([rewrite.plain])[0]
    splicer = Splicer(A1111Encoder(shared.sd_model.cond_stage_model), sources, Options(concepts=tuple(concepts)))
    with torch.no_grad():
        return splicer.splice(rewrite.marked, base), base


def sks_source():
    embedding = sd_hijack.model_hijack.embedding_db.word_embeddings["sks"]
    return ConceptSource.embedding("sks", 1, embedding)


def test_disabled_is_bit_identical_to_no_extension():
    plain = generate(Processing(["a <sks> playing badminton"]))
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    off = generate(Processing(["a <sks> playing badminton"]), script_args(SKS, enabled=False))
    assert off.prompts == ["a <sks> playing badminton"] and off.alignit_state is None
    for a, b in zip(plain.sampled[0], off.sampled[0], strict=True):
        assert torch.equal(a, b)  # conditioning and UNet output of every step


def test_the_refiner_gets_the_class_word_prompt(webui, text_model, tokenizer):
    """After the refiner switch the WebUI encodes p anew with the refiner's encoder: the class-word prompt without the
    concept. With a refiner of the same weights, AlignIT switching at 0.5 is AlignIT with the step range 0-0.5."""
    refined = Processing(["a <sks> playing badminton"], steps=4)
    refined.refiner, refined.refiner_switch_at = FakeModel(text_model, tokenizer, webui.unet), 0.5
    refined.refiner_checkpoint_info = object()
    try:
        generate(refined, script_args(SKS))
    finally:
        shared.sd_model = webui
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    ranged = generate(Processing(["a <sks> playing badminton"], steps=4), script_args(SKS, end=0.5))
    assert refined.extra_generation_params["AlignIT warning"] == flow.REFINER_NOTE
    assert "AlignIT warning" not in ranged.extra_generation_params
    for a, b in zip(refined.sampled[0], ranged.sampled[0], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(refined.sampled[0][0], refined.sampled[0][-2])  # the concept rows, then the class word's


def test_batch_of_different_prompts_with_and_editing_and_step_range():
    prompts = ["a <sks> playing badminton AND a garden", "a [dog:<sks>:5] on a sofa", "a cat"]
    on = generate(Processing(prompts, steps=10, batch_size=3), script_args(SKS, start=0.2, end=0.8))
    Processing.cached_c = [None, None]
    plain = generate(Processing([p.replace("<sks>", "cat") for p in prompts], steps=10, batch_size=3))
    assert on.comments == {} and on.prompts == ["a cat playing badminton AND a garden", "a [dog:cat:5] on a sofa", "a cat"]

    aligned_0, base_0 = expected_aligned("a <sks> playing badminton", [Concept(*SKS)], [sks_source()])
    aligned_1, base_1 = expected_aligned("a <sks> on a sofa", [Concept(*SKS)], [sks_source()])
    # rows of the batch: item 0 has two AND parts (0, 1), item 1 is row 2, item 2 row 3
    for step in range(10):
        got, want = on.sampled[0][2 * step], plain.sampled[0][2 * step]
        active = 2 <= step < 8
        assert torch.equal(got[0], aligned_0 if active else base_0), step
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[2], aligned_1 if active and step > 5 else want[2]), step
        assert torch.equal(got[3], want[3])
    changed = (aligned_0 != base_0).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2]  # one vector for one class-word token: only the concept row moves
    assert on.extra_generation_params == {"AlignIT 1": "<sks> → cat, source: sks", "AlignIT steps": "0.2-0.8"}


def test_strength_per_concept():
    p = generate(Processing(["a <sks>"], steps=1), script_args(["<sks>", "cat", "sks", 0.25]))
    aligned, base = expected_aligned("a <sks>", [Concept(*SKS)], [sks_source()])
    assert torch.equal(p.sampled[0][0][0][2], torch.lerp(base[2], aligned[2], 0.25))
    assert p.extra_generation_params["AlignIT 1"] == "<sks> → cat, source: sks, strength: 0.25"


def test_negative_prompt_untouched_and_cache_not_poisoned():
    on = generate(Processing(["a <sks>"], negative="blurry"), script_args(SKS))
    aligned, base = expected_aligned("a <sks>", [Concept(*SKS)], [sks_source()])
    assert torch.equal(on.sampled[0][0][0], aligned)
    assert Processing.cached_c == [None, None]  # the shared cache never saw AlignIT's conditioning
    assert torch.equal(on.uc[0][0].cond, shared.sd_model.cond_stage_model(["blurry"])[0])
    later = generate(Processing(["a cat"], negative="blurry"))
    assert torch.equal(later.sampled[0][0][0], base)


def test_several_batches_reuse_the_plain_conditioning():
    p = generate(Processing(["a <sks>", "a <sks>"], batch_size=1, steps=3), script_args(SKS))
    aligned, _ = expected_aligned("a <sks>", [Concept(*SKS)], [sks_source()])
    for batch in p.sampled:
        assert all(torch.equal(batch[2 * step][0], aligned) for step in range(3))


def test_hires_pass_gets_its_own_prompt_and_steps():
    p = generate(Processing(["a <sks>"], hr_prompts=["a <sks> in snow"], steps=4, hr_steps=3), script_args(SKS, end=0.5))
    first, hires = p.sampled
    aligned, base = expected_aligned("a <sks> in snow", [Concept(*SKS)], [sks_source()])
    assert len(hires) == 6
    assert [torch.equal(hires[2 * step][0], aligned) for step in range(3)] == [True, True, False]
    assert torch.equal(hires[4][0], base)


def test_multi_vector_embedding_by_its_own_name():
    p = generate(Processing(["lisa reading a book"], steps=2), script_args(["lisa", "woman", "", 1.0]))
    source = ConceptSource.embedding("lisa", 3, sd_hijack.model_hijack.embedding_db.word_embeddings["lisa"])
    aligned, _ = expected_aligned("lisa reading a book", [Concept("lisa", "woman")], [source])
    assert p.prompts == ["woman reading a book"]
    assert torch.equal(p.sampled[0][0][0], aligned)


@pytest.mark.parametrize(
    ("rows", "placeholder", "message"),
    [
        ([["<nope>", "cat", "", 1.0]], "*", "no embedding named '<nope>'"),
        ([["<sks>", "", "sks", 1.0]], "*", "class word is empty"),
        ([SKS], "two words", "it must be one"),
    ],
)
def test_bad_concepts_leave_the_prompt_to_the_webui(rows, placeholder, message):
    prompt = rows[0][0] + " on a sofa"
    p = generate(Processing([prompt], steps=2), script_args(*rows, placeholder=placeholder))
    Processing.cached_c = [None, None]
    plain = generate(Processing([prompt], steps=2))
    assert any(message in text for text in p.comments), p.comments
    assert message in p.extra_generation_params["AlignIT warning"]  # API responses carry the infotext
    assert p.prompts == [prompt]
    assert all(torch.equal(a, b) for a, b in zip(p.sampled[0], plain.sampled[0], strict=True))


def test_a_layout_the_webui_disagrees_with_is_left_alone(monkeypatch):
    clip = shared.sd_model.cond_stage_model
    real = clip.tokenize_line
    monkeypatch.setattr(clip, "tokenize_line", lambda line: (real(line + " extra")[0], 0))
    p = generate(Processing(["a <sks>"], steps=2), script_args(SKS))
    assert p.prompts == ["a <sks>"]
    assert any("differently from the WebUI" in text for text in p.comments)


def test_concept_keys_and_values_in_every_cross_attention_layer(webui):
    unet = webui.unet
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0][0].clone(), output[0].clone()))

        return hook

    layers = {name: module for name, module in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))}
    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        generate(Processing(["a <sks> playing badminton"], steps=1), script_args(SKS))
    finally:
        for handle in handles:
            handle.remove()
    aligned, base = expected_aligned("a <sks> playing badminton", [Concept(*SKS)], [sks_source()])
    assert len(seen) == len(layers) == 14
    for name, (context, projected) in seen.items():
        assert torch.equal(context, aligned), name
        weight = layers[name].weight
        assert torch.allclose(projected[2], weight @ aligned[2], atol=1e-5)  # concept row: W·c'
        others = [i for i in range(77) if i != 2]
        assert torch.allclose(projected[others], base[others] @ weight.T, atol=1e-5)  # every other row: W·c
    assert all(not module._forward_hooks for module in layers.values())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["garbage"], "'enabled' must be true or false, not 'garbage'; generating without AlignIT"),
        ([{"enabled": True, "concepts": ["abc"]}], "concept 1 must be a list"),
        ([{"enabled": True, "concepts": []}], "AlignIT is enabled but no concept row is filled in"),
    ],
)
def test_bad_api_arguments_say_so_and_render_plain(arguments, message):
    p = generate(Processing(["a <sks> on a sofa"], steps=2), arguments)
    Processing.cached_c = [None, None]
    plain = generate(Processing(["a <sks> on a sofa"], steps=2))
    assert message in p.extra_generation_params["AlignIT warning"]
    assert not any(key.startswith("AlignIT ") and key[8:].isdigit() for key in p.extra_generation_params)
    assert all(torch.equal(a, b) for a, b in zip(p.sampled[0], plain.sampled[0], strict=True))


def test_a_concept_the_prompt_never_names_is_said_and_not_recorded():
    lisa = ["lisa", "woman", "", 1.0]
    p = generate(Processing(["a <sks> on a sofa"], steps=2), script_args(SKS, lisa))
    assert "concept 'lisa': its trigger is not in the prompt" in p.extra_generation_params["AlignIT warning"]
    assert p.extra_generation_params["AlignIT 1"] == "<sks> → cat, source: sks"
    assert "AlignIT 2" not in p.extra_generation_params


def test_a_step_range_that_covers_no_step_says_so_and_installs_nothing():
    p = generate(Processing(["a <sks> on a sofa"], steps=1), script_args(SKS, start=0.1, end=0.8))
    warning = p.extra_generation_params["AlignIT warning"]
    assert warning == "the step range 0.1-0.8 covers no sampling step of this pass: the class word is used throughout"
    Processing.cached_c = [None, None]
    plain = generate(Processing(["a cat on a sofa"], steps=1))
    assert all(torch.equal(a, b) for a, b in zip(p.sampled[0], plain.sampled[0], strict=True))
