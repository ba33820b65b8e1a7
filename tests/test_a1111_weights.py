"""Weight-side concepts (LoRA, Custom Diffusion) through the A1111 glue, in A1111's hook order (tests/contract)."""

from types import SimpleNamespace

import kv_checks
import networks
import pytest
import torch
import torch.nn.functional as F
import webui_flow
from ldm_parts import tiny_sd15_unet, weights_digest
from modules import sd_hijack, shared
from safetensors.torch import save_file
from webui_flow import FakeModel, Processing, generate, script_args
from weight_files import cd_state, lora_state, random_cd_weights, random_factors, random_text_factors

from alignit.hosts.webui import a1111, flow
from alignit.kv_hooks import attn2_modules

LORA = ["ohwx", "man", "lora:ohwx_lora:0.8", 1.0]
CD = ["<new1> cat", "cat", "cd:mycat", 1.0]


@pytest.fixture
def webui(text_model, tokenizer, vectors, tmp_path, monkeypatch):
    unet = tiny_sd15_unet()
    shared.sd_model = FakeModel(text_model, tokenizer, unet)
    database = sd_hijack.EmbeddingDatabase()
    sd_hijack.model_hijack.embedding_db = database
    clip = shared.sd_model.cond_stage_model
    database.register_embedding(sd_hijack.Embedding(vectors(2), "sks"), clip.tokenize(["sks"])[0])
    factors, text = random_factors(unet), random_text_factors(text_model)
    save_file(lora_state(factors, text, "kohya"), str(tmp_path / "ohwx_lora.safetensors"))
    save_file({"x.weight": torch.zeros(1)}, str(tmp_path / "empty.safetensors"))
    monkeypatch.setattr(
        networks,
        "available_network_aliases",
        {
            "ohwx_lora": SimpleNamespace(filename=str(tmp_path / "ohwx_lora.safetensors")),
            "empty": SimpleNamespace(filename=str(tmp_path / "empty.safetensors")),
        },
    )
    cd_dir = tmp_path / "cd"
    cd_dir.mkdir()
    cd_weights = random_cd_weights(unet)
    torch.save(
        cd_state(cd_weights, torch.randn(1, 32, generator=torch.Generator().manual_seed(9)), "delta_bin"), cd_dir / "mycat.bin"
    )
    torch.save(cd_state({k: torch.zeros(8, 8) for k in cd_weights}, torch.zeros(1, 32), "delta_bin"), cd_dir / "narrow.bin")
    (cd_dir / "broken.bin").write_bytes(b"not a delta")
    monkeypatch.setattr(shared.opts, "alignit_custom_diffusion_dir", str(cd_dir), raising=False)
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    yield SimpleNamespace(unet=unet, factors=factors, cd=cd_weights, model=shared.sd_model)
    a1111.retire_hooks()


@pytest.fixture
def seen(monkeypatch):
    """The context and output of every attn2 to_k/to_v call, observed after AlignIT's own hooks."""
    calls = []
    original = flow.before_sampling

    def observed(p, c):
        original(p, c)
        for key, module in attn2_modules(shared.sd_model.unet).items():
            module.register_forward_hook(lambda m, i, o, k=key: calls.append((k, i[0][0].clone(), o[0].clone())))

    monkeypatch.setattr(webui_flow.flow, "before_sampling", observed)
    yield calls
    for module in attn2_modules(shared.sd_model.unet).values():
        module._forward_hooks.clear()


def low_rank(webui, key, multiplier):
    down, up, alpha = webui.factors[key]
    return lambda x: F.linear(F.linear(x, down), up) * float(alpha) / 2 * multiplier


def concept_rows(p, first, count):
    """Rows ``first .. first+count`` of the first prompt's conditioning as sampled."""
    return p.sampled[0][0][0][first : first + count]


def test_lora_on_keys_and_values_only(webui, seen):
    before = weights_digest(webui.unet)
    p = generate(Processing(["a photo of ohwx playing badminton <lora:ohwx_lora:1>"], steps=1), script_args(LORA))
    assert p.comments == {} and p.extra_network_data == {}  # the tag never reached the UNet
    assert p.prompts[0].strip() == "a photo of man playing badminton"
    n = len(shared.sd_model.cond_stage_model.tokenize(["ohwx"])[0])
    assert len(seen) == 32
    for key, context, out in seen:
        weight = attn2_modules(webui.unet)[key].weight
        concept = context[4 : 4 + n]
        torch.testing.assert_close(
            out[4 : 4 + n], F.linear(concept, weight) + low_rank(webui, key, 0.8)(concept), rtol=1e-5, atol=1e-6
        )
        others = [i for i in range(77) if not 4 <= i < 4 + n]
        assert torch.equal(out[others], F.linear(context, weight)[others])
    assert weights_digest(webui.unet) == before


def test_lora_text_encoder_part_shapes_only_the_concept_rows(webui):
    with_te = generate(Processing(["a photo of ohwx"], steps=1), script_args(LORA))
    plain = generate(Processing(["a photo of man"], steps=1))
    n = len(shared.sd_model.cond_stage_model.tokenize(["ohwx"])[0])
    cond, base = with_te.sampled[0][0][0], plain.sampled[0][0][0]
    assert torch.equal(cond[:4], base[:4])
    assert not torch.allclose(concept_rows(with_te, 4, n), base[4 : 4 + n])


def test_lora_on_the_whole_unet(webui, seen):
    before = weights_digest(webui.unet)
    base = {key: module.weight.clone() for key, module in attn2_modules(webui.unet).items()}
    p = generate(Processing(["a photo of ohwx playing badminton"], steps=1), script_args(LORA, scope="full"))
    assert [params.items for params in p.extra_network_data["lora"]] == [["ohwx_lora", "0", "0.8"]]
    assert p.extra_generation_params["AlignIT LoRA scope"] == "full"
    n = len(shared.sd_model.cond_stage_model.tokenize(["ohwx"])[0])
    for key, context, out in seen:
        base_weight = base[key]  # the WebUI ran W + 0.8·ΔW on every token
        concept = context[4 : 4 + n]
        torch.testing.assert_close(
            out[4 : 4 + n], F.linear(concept, base_weight) + low_rank(webui, key, 0.8)(concept), rtol=1e-4, atol=1e-5
        )
        others = [i for i in range(77) if not 4 <= i < 4 + n]
        torch.testing.assert_close(out[others], F.linear(context[others], base_weight), rtol=1e-4, atol=1e-5)
    assert weights_digest(webui.unet) == before


def test_custom_diffusion_with_its_modifier_token(webui, seen):
    p = generate(Processing(["a <new1> cat playing badminton"], steps=1), script_args(CD))
    assert p.comments == {} and p.prompts == ["a cat playing badminton"]
    for key, context, out in seen:
        # <new1>, cat: W_cd·c', computed as W·c' + (W_cd·c' - W·c')
        torch.testing.assert_close(out[2:4], F.linear(context[2:4], webui.cd[key]), rtol=1e-5, atol=1e-5)
        weight = attn2_modules(webui.unet)[key].weight
        assert torch.equal(out[4:], F.linear(context, weight)[4:])


def test_three_kinds_of_concept_in_one_prompt(webui, seen):
    sks = ["<sks>", "dog", "sks", 1.0]
    p = generate(Processing(["<sks> and a <new1> cat meet ohwx"], steps=1), script_args(sks, CD, LORA))
    assert p.comments == {} and p.prompts == ["dog and a cat meet man"]
    n = len(shared.sd_model.cond_stage_model.tokenize(["ohwx"])[0])
    # rows: BOS, sks(2), and, a, <new1>, cat, meet, ohwx(n)
    for key, context, out in seen:
        weight = attn2_modules(webui.unet)[key].weight
        assert torch.equal(out[1:3], F.linear(context, weight)[1:3])  # a textual inversion changes no weight
        torch.testing.assert_close(out[5:7], F.linear(context[5:7], webui.cd[key]), rtol=1e-5, atol=1e-5)
        concept = context[8 : 8 + n]
        torch.testing.assert_close(
            out[8 : 8 + n], F.linear(concept, weight) + low_rank(webui, key, 0.8)(concept), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["ohwx", "man", "lora:nobody", 1.0], "no LoRA named 'nobody'"),
        (["ohwx", "man", "lora:empty", 1.0], "holds no LoRA factors"),
        (["<new1> cat", "cat", "cd:narrow", 1.0], "made for another model"),
        (["<new1> cat", "cat", "cd:broken", 1.0], "cannot read broken.bin"),
        (["<new1> cat", "cat", "cd:absent", 1.0], "no Custom Diffusion delta 'absent'"),
    ],
)
def test_bad_sources_warn_and_the_image_renders(webui, row, message):
    prompt = f"a {row[0]} on a sofa"
    p = generate(Processing([prompt], steps=2), script_args(row))
    Processing.cached_c = [None, None]
    plain = generate(Processing([prompt], steps=2))
    assert message in p.extra_generation_params["AlignIT warning"]
    assert all(torch.equal(a, b) for a, b in zip(p.sampled[0], plain.sampled[0], strict=True))


def test_hooks_left_by_a_failed_generation_retire(webui):
    failing = Processing(["a photo of ohwx"], steps=3)
    failing.fail_at_step = 1
    with pytest.raises(RuntimeError, match="sampling failed"):
        generate(failing, script_args(LORA))
    assert any(m._forward_hooks for m in attn2_modules(webui.unet).values())  # postprocess_batch never ran
    Processing.cached_c = [None, None]
    later = generate(Processing(["a photo of man"], steps=2))  # no AlignIT call at all: the hooks see a new job
    assert all(not m._forward_hooks for m in attn2_modules(webui.unet).values())
    a1111.retire_hooks()
    Processing.cached_c = [None, None]
    again = generate(Processing(["a photo of man"], steps=2))
    assert all(torch.equal(a, b) for a, b in zip(later.sampled[0], again.sampled[0], strict=True))


def test_a_hypernetwork_keeps_weight_side_concepts_out(webui, monkeypatch):
    monkeypatch.setattr(shared, "loaded_hypernetworks", ["some hypernetwork"])
    p = generate(Processing(["<sks> meets ohwx"], steps=1), script_args(["<sks>", "dog", "sks", 1.0], LORA))
    assert "a hypernetwork is active" in p.extra_generation_params["AlignIT warning"]
    assert p.prompts == ["dog meets ohwx"]


@pytest.fixture
def recorded(monkeypatch):
    """Every attn2 to_k/to_v call of every UNet call ((layer, proj), context, output), observed after AlignIT's hooks;
    ``take()`` returns the calls so far and starts afresh."""
    calls: list = []
    handles: list = []
    original = flow.before_sampling

    def observed(p, c):
        original(p, c)
        for handle in handles:
            handle.remove()
        handles[:] = [
            module.register_forward_hook(lambda m, i, o, k=key: calls.append((k, i[0].clone(), o.clone())))
            for key, module in attn2_modules(shared.sd_model.unet).items()
        ]

    def take():
        taken = list(calls)
        calls.clear()
        return taken

    monkeypatch.setattr(webui_flow.flow, "before_sampling", observed)
    yield take
    for handle in handles:
        handle.remove()


def run_batch(prompts, *rows, enabled=True):
    Processing.cached_c, Processing.cached_uc, Processing.cached_hr_c = [None, None], [None, None], [None, None]
    p = Processing(prompts, steps=1, batch_size=2, negative=kv_checks.NEGATIVE, hr_prompts=prompts, hr_steps=1)
    return generate(p, script_args(*rows, enabled=enabled))


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_only_the_concept_rows_of_the_prompt_holding_it_change(webui, recorded, strength):
    """Batch of a prompt with the trigger (and an AND part without it) and one without, a negative prompt sharing
    their prefix, first pass and hires pass: only the concept's row differs from AlignIT off with the class word."""
    run_batch(kv_checks.PLAIN, LORA, enabled=False)
    off = recorded()
    run_batch(kv_checks.PROMPTS, LORA[:3] + [1.0])
    c_prime = kv_checks.concept_row(recorded(), off)
    p = run_batch(kv_checks.PROMPTS, LORA[:3] + [strength])
    assert "AlignIT warning" not in p.extra_generation_params
    on = recorded()
    assert len(on) == 2 * 32  # first pass and hires pass
    kv_checks.check_against_plain(
        on, off, strength, c_prime, lambda key: attn2_modules(webui.unet)[key].weight, lambda key, x: low_rank(webui, key, 0.8)(x)
    )


def test_a_full_scope_lora_outside_an_empty_step_range_is_said_right(webui, recorded):
    """One step and a range of 0.1-0.8: no step uses the concept rows. The message says so (not 'never reached'),
    and the full-scope LoRA still comes off every row: the keys/values are those of the class-word prompt."""
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    generate(Processing(["a photo of man playing"], steps=1), script_args(LORA, enabled=False))
    off = recorded()
    p = generate(Processing(["a photo of ohwx playing"], steps=1), script_args(LORA, scope="full", start=0.1, end=0.8))
    on = recorded()
    warning = p.extra_generation_params["AlignIT warning"]
    assert warning == "the step range 0.1-0.8 covers no sampling step of this pass: the class word is used throughout"
    assert len(on) == len(off) == 32
    for (key, _, out), (plain_key, _, plain) in zip(on, off):
        assert key == plain_key
        torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
