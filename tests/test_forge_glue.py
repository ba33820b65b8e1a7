"""The Forge glue (alignit.hosts.forge) in Forge's hook order against the contract in tests/contract: the text-side
splice, the attn2 patches on a cloned UNet patcher (exact K/V, cond rows only, LCM tiling, hires, coexisting with an
earlier replace patch), LoRA through Forge's key maps, and nothing left behind."""

from types import SimpleNamespace

import forge_flow
import kv_checks
import networks
import pytest
import torch
import torch.nn.functional as F
import webui_flow
from backend import attention
from forge_flow import FakeForgeModel, ForgeProcessing, generate
from ldm_parts import tiny_sd15_unet, weights_digest
from modules import prompt_parser, sd_hijack, shared
from safetensors.torch import save_file
from webui_flow import script_args
from weight_files import cd_state, lora_state, random_cd_weights, random_factors, random_text_factors

from alignit.attn2_slots import block_key, cond_batch_rows
from alignit.hosts.webui import flow
from alignit.kv import ConceptRows, KVRewriter, LowRank, MarkedChunk
from alignit.kv_hooks import KVInjector, attn2_modules

LORA = ["ohwx", "man", "lora:ohwx_lora:0.8", 1.0]
CD = ["<new1> cat", "cat", "cd:mycat", 1.0]
EMBEDDING = ["sks", "cat", "", 1.0]


@pytest.fixture
def forge(text_model, tokenizer, vectors, tmp_path, monkeypatch):
    unet = tiny_sd15_unet()
    model = FakeForgeModel({"clip_l": text_model}, tokenizer, unet)
    monkeypatch.setattr(shared, "sd_model", model)
    engine = model.text_processing_engine
    engine.embeddings.register_embedding(sd_hijack.Embedding(vectors(2), "sks"), engine.tokenize(["sks"])[0])
    factors, text = random_factors(unet), random_text_factors(text_model)
    save_file(lora_state(factors, text, "kohya_ldm"), str(tmp_path / "ohwx_lora.safetensors"))
    loha = {}
    for (layer, proj), (down, up, alpha) in factors.items():
        base = "lora_unet_" + f"{layer}.to_{proj}".replace(".", "_")
        loha |= {f"{base}.hada_w1_a": up, f"{base}.hada_w1_b": down, f"{base}.alpha": alpha}
        loha |= {f"{base}.hada_w2_a": up * 0.5, f"{base}.hada_w2_b": down.clone()}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    aliases = {name: SimpleNamespace(filename=str(tmp_path / f"{name}.safetensors")) for name in ("ohwx_lora", "loha")}
    monkeypatch.setattr(networks, "available_network_aliases", aliases)
    cd_dir = tmp_path / "cd"
    cd_dir.mkdir()
    cd_weights = random_cd_weights(unet)
    modifier = torch.randn(1, 32, generator=torch.Generator().manual_seed(9))
    torch.save(cd_state(cd_weights, modifier, "delta_bin"), cd_dir / "mycat.bin")
    monkeypatch.setattr(shared.opts, "alignit_custom_diffusion_dir", str(cd_dir), raising=False)
    ForgeProcessing.cached_c, ForgeProcessing.cached_uc = [None, None, None], [None, None, None]
    return SimpleNamespace(unet=unet, model=model, factors=factors, cd=cd_weights, modifier=modifier)


def recorder(seen: list):
    """An earlier extension's attn2 replace patch on every layer, keyed ``(block, id)`` as IP-Adapter does for SD1.5
    (IPAdapterPlus.py 764-769): it records the k/v it is handed and attends."""

    def hook(p):
        unet = p.sd_model.forge_objects.unet.clone()
        for layer, _ in attn2_modules(unet.model.diffusion_model):
            name, number, _index = block_key(layer)

            def replace(q, k, v, extra_options, layer=layer):
                seen.append((layer, k.clone(), v.clone(), extra_options))
                return attention.attention_function(q, k, v, extra_options["n_heads"])

            unet.set_model_attn2_replace(replace, name, number)
        p.sd_model.forge_objects.unet = unet

    return hook


def projection(forge, layer, proj, x):
    return F.linear(x, attn2_modules(forge.unet)[(layer, proj)].weight)


def test_block_keys_and_cond_rows():
    assert block_key("input_blocks.4.1.transformer_blocks.1.attn2") == ("input", 4, 1)
    assert block_key("middle_block.1.transformer_blocks.0.attn2") == ("middle", 0, 0)
    assert block_key("output_blocks.11.1.transformer_blocks.0.attn2") == ("output", 11, 0)
    assert cond_batch_rows({"cond_or_uncond": [1, 0]}, 4).tolist() == [2, 3]
    assert cond_batch_rows({"cond_or_uncond": [0, 1, 0]}, 3).tolist() == [0, 2]
    assert cond_batch_rows({}, 2) is None


def test_embedding_concept_is_spliced_with_the_engine(forge, encoder, vectors):
    plain = generate(ForgeProcessing(["a photo of cat"], steps=1))
    p = generate(ForgeProcessing(["a photo of sks"], steps=1), script_args(EMBEDDING))
    assert p.prompts == ["a photo of cat"]
    cond, want_plain = p.sampled[0][1][0], plain.sampled[0][1][0]
    assert torch.equal(cond[:4], want_plain[:4]) and torch.equal(cond[6:], torch.cat([want_plain[5:75], want_plain[76:]]))
    dummy = [encoder.id_start, *encoder.tokenize(["* * *"])[0], 0, 0] + [encoder.id_end] * 71
    with torch.no_grad():
        concept = encoder.encode_chunk(dummy, [1.0] * 77, [(3, vectors(2))])[4:6]
    assert torch.equal(cond[4:6], concept)
    assert forge.model.text_processing_engine.embeddings.fixes is None  # taken by the engine, as Forge does
    assert "AlignIT warning" not in p.extra_generation_params


def test_lora_keys_values_match_the_a1111_hooks_exactly(forge):
    seen = []
    digest = weights_digest(forge.unet)
    p = generate(ForgeProcessing(["a photo of ohwx"], steps=2), script_args(LORA), earlier=[recorder(seen)])
    assert "AlignIT warning" not in p.extra_generation_params
    assert len(seen) == 2 * 16
    splicer = getattr(p, flow.STATE_ATTRIBUTE).splicer
    uncond = prompt_parser.reconstruct_cond_batch(p.uc, 0)
    context = torch.cat([uncond, p.sampled[0][1]])  # uncond ‖ cond, as the sampler batches them
    for layer, k, v, extra in seen:
        assert extra["cond_or_uncond"] == [1, 0]
        for proj, got in (("k", k), ("v", v)):
            module = attn2_modules(forge.unet)[(layer, proj)]
            with torch.no_grad(), KVInjector(forge.unet, splicer.kv_chunks(), splicer.kv_weights()):
                want = module(context)
            assert torch.equal(got, want)  # the same rows as A1111's forward hooks write
            base = projection(forge, layer, proj, context)
            assert torch.equal(got[0], base[0])  # uncond untouched
            assert torch.equal(got[1, :4], base[1, :4]) and torch.equal(got[1, 5:], base[1, 5:])  # "ohwx": one token
            down, up, alpha = forge.factors[(layer, proj)]
            delta = LowRank(down, up, float(alpha) / 2).times(0.8).delta(context[1, 4:5])
            torch.testing.assert_close(got[1, 4:5], base[1, 4:5] + delta, rtol=1e-5, atol=1e-6)
    assert weights_digest(forge.unet) == digest
    assert forge.model.forge_objects_original.unet.model_options == {"transformer_options": {}}


def test_only_cond_rows_change_and_tiled_rows_too(forge):
    seen = []
    long_negative = ", ".join(["blurry, low quality, watermark"] * 12)  # two chunks
    p = ForgeProcessing(["a photo of ohwx"], steps=1, negative=long_negative)
    p = generate(p, script_args(LORA), earlier=[recorder(seen)])
    cond = p.sampled[0][1]
    layer, k, _, _ = seen[0]
    uncond = prompt_parser.reconstruct_cond_batch(p.uc, 0)
    assert uncond.shape[1] == 154
    base = projection(forge, layer, "k", torch.cat([uncond, cond.repeat(1, 2, 1)]))
    assert torch.equal(k[0], base[0])
    for start in (4, 81):  # the cond context is tiled to 154 rows: the concept is at t and t + 77
        assert not torch.equal(k[1, start], base[1, start])
        assert torch.equal(k[1, start + 1 : start + 10], base[1, start + 1 : start + 10])


def marked_chunk(position: int, seed: int = 3) -> tuple[MarkedChunk, torch.Tensor]:
    """A spliced chunk with one concept row at ``position``, and its 77 rows."""
    chunk = torch.randn(77, 32, generator=torch.Generator().manual_seed(seed))
    return MarkedChunk(chunk, (ConceptRows(0, (position,), chunk[position : position + 1], 1.0),)), chunk


def test_chunks_in_uncond_are_left_alone(forge):
    layer = "input_blocks.1.1.transformer_blocks.0.attn2"
    lora = {(layer, "k"): LowRank(torch.randn(2, 32), torch.randn(32, 2), 1.0)}
    marked, chunk = marked_chunk(5)
    rewriter = KVRewriter([marked], [lora])
    context = chunk.repeat(2, 1, 1)  # the spliced chunk in both, but row 0 is uncond
    k = projection(forge, layer, "k", context)
    got = rewriter.rewrite((layer, "k"), context, k.clone(), cond_batch_rows({"cond_or_uncond": [1, 0]}, 2))
    assert torch.equal(got[0], k[0]) and not torch.equal(got[1, 5], k[1, 5])


def test_hires_pass_gets_the_patch_again(forge):
    seen = []
    p = ForgeProcessing(["a photo of ohwx"], steps=1, hr_prompts=["a photo of ohwx"], hr_steps=1)
    p = generate(p, script_args(LORA), earlier=[recorder(seen)])
    assert len(seen) == 2 * 16  # first pass and hires pass, each through the recorder after AlignIT's rewrite
    hires = [k for layer, k, _, _ in seen[16:]]
    first = [k for layer, k, _, _ in seen[:16]]
    assert all(torch.equal(a, b) for a, b in zip(first, hires))
    assert "AlignIT warning" not in p.extra_generation_params


def test_custom_diffusion_and_full_scope(forge):
    seen = []
    p = generate(ForgeProcessing(["a <new1> cat"], steps=1), script_args(CD), earlier=[recorder(seen)])
    assert p.prompts == ["a cat"]
    cond = p.sampled[0][1][0]
    for layer, k, v, _ in seen:  # "<new1> cat": the modifier vector and "cat" at rows 2-3, W_cd·c' there
        for proj, got in (("k", k), ("v", v)):
            torch.testing.assert_close(got[1, 2:4], F.linear(cond[2:4], forge.cd[(layer, proj)]), rtol=1e-5, atol=1e-5)
            assert torch.equal(got[1, 4:], projection(forge, layer, proj, cond[4:]))
    seen.clear()
    p = generate(ForgeProcessing(["a photo of ohwx"], steps=1), script_args(LORA, scope="full"), earlier=[recorder(seen)])
    assert "AlignIT warning" not in p.extra_generation_params
    layer, k, _, _ = seen[0]
    cond = p.sampled[0][1]
    base = projection(forge, layer, "k", cond)
    torch.testing.assert_close(k[1, 5:], base[0, 5:], rtol=1e-5, atol=1e-5)  # the LoRA taken back out
    down, up, alpha = forge.factors[(layer, "k")]
    want = base[0, 4:5] + LowRank(down, up, float(alpha) / 2).times(0.8).delta(cond[0, 4:5])
    torch.testing.assert_close(k[1, 4:5], want, rtol=1e-5, atol=1e-5)


def test_loha_is_merged_with_forges_own_maths(forge):
    seen = []
    p = generate(
        ForgeProcessing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:loha", 1.0]), earlier=[recorder(seen)]
    )
    assert "AlignIT warning" not in p.extra_generation_params
    layer, k, _, _ = seen[0]
    down, up, alpha = forge.factors[(layer, "k")]
    delta_w = (up @ down) * (0.5 * up @ down) * float(alpha) / 2
    cond = p.sampled[0][1][0]
    want = projection(forge, layer, "k", cond[4:5]) + F.linear(cond[4:5], delta_w)
    torch.testing.assert_close(k[1, 4:5], want, rtol=1e-5, atol=1e-5)


def test_ia3_which_forges_loader_does_not_read_is_refused(forge, tmp_path, monkeypatch):
    layer, proj = next(iter(attn2_modules(forge.unet)))
    base = "lora_unet_" + f"{layer}.to_{proj}".replace(".", "_")
    save_file({f"{base}.weight": torch.ones(32), f"{base}.on_input": torch.tensor(False)}, str(tmp_path / "ia3.safetensors"))
    monkeypatch.setitem(networks.available_network_aliases, "ia3", SimpleNamespace(filename=str(tmp_path / "ia3.safetensors")))
    p = generate(ForgeProcessing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:ia3", 1.0]))
    assert p.extra_generation_params["AlignIT warning"] == (
        "LoRA 'ia3': it holds (IA)³ modules, which Forge's LoRA loader does not read (A1111's does); this concept is left "
        "to the WebUI; no usable concept; generating without AlignIT"
    )


def test_nothing_is_left_after_a_failed_generation(forge):
    plain = generate(ForgeProcessing(["a photo of a man"], steps=1))
    p = ForgeProcessing(["a photo of ohwx"], steps=2)
    p.fail_at_step = 1
    with pytest.raises(RuntimeError):
        generate(p, script_args(LORA))
    assert forge.model.forge_objects_original.unet.model_options == {"transformer_options": {}}
    assert forge.model.forge_objects_after_applying_lora.unet.model_options == {"transformer_options": {}}
    again = generate(ForgeProcessing(["a photo of a man"], steps=1))
    assert all(torch.equal(a, b) for a, b in zip(plain.sampled[0], again.sampled[0]))


def test_flux_and_sd3_are_refused_with_a_message(forge, monkeypatch):
    assert flow.model_problem(forge_flow.HOST) is None
    monkeypatch.setattr(forge.model, "is_sd1", False)
    assert "applies to SD1.x, SD2.x and SDXL models" in flow.model_problem(forge_flow.HOST)
    p = generate(ForgeProcessing(["a photo of sks"], steps=1), script_args(EMBEDDING))
    assert "applies to SD1.x, SD2.x and SDXL models" in p.extra_generation_params["AlignIT warning"]
    assert p.prompts == ["a photo of sks"]
    with monkeypatch.context() as m:  # Forge's stand-in before a checkpoint loads (modules/sd_models.py:385)
        m.setattr(shared, "sd_model", SimpleNamespace(cond_stage_model=None))
        assert flow.model_problem(forge_flow.HOST) is None
    monkeypatch.setattr(forge.model, "is_sd3", True)
    monkeypatch.setattr(forge.model, "is_sdxl", True)
    p = generate(ForgeProcessing(["a photo of sks"], steps=1), script_args(EMBEDDING))
    assert "applies to SD1.x, SD2.x and SDXL models" in p.extra_generation_params["AlignIT warning"]


def test_same_conditioning_as_on_a1111(forge, text_model, tokenizer, monkeypatch):
    """The same prompt through both hosts' flows gives bit-identical spliced conditioning."""
    prompts = ["sks on a sofa, (sks:1.2) again", "a dog"]
    forge_p = generate(ForgeProcessing(prompts, steps=2, batch_size=2), script_args(EMBEDDING))
    engine = forge.model.text_processing_engine
    monkeypatch.setattr(shared, "sd_model", webui_flow.FakeModel(text_model, tokenizer))
    monkeypatch.setattr(sd_hijack.model_hijack, "embedding_db", engine.embeddings)
    monkeypatch.setattr(webui_flow.Processing, "cached_c", [None, None])
    a1111_p = webui_flow.generate(webui_flow.Processing(prompts, steps=2, batch_size=2), script_args(EMBEDDING))
    assert torch.equal(forge_p.sampled[0][1], a1111_p.sampled[0][0])


def test_a_failure_inside_the_patch_costs_the_weights_not_the_image(forge, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(KVRewriter, "rewrite", broken)
    p = generate(ForgeProcessing(["a photo of ohwx"], steps=2), script_args(LORA))
    assert len(p.sampled[0]) == 4  # both steps ran
    warning = p.extra_generation_params["AlignIT warning"]
    assert "RuntimeError: boom; the concept's own key/value weights were not applied" in warning


def test_contexts_of_later_steps_are_matched_afresh(forge):
    """A context of the next step may reuse the memory of the last one; inference tensors have no version."""
    layer = "input_blocks.1.1.transformer_blocks.0.attn2"
    chunks = [marked_chunk(5, seed=3), marked_chunk(9, seed=4)]
    rewriter = KVRewriter(
        [marked for marked, _ in chunks], [{(layer, "k"): LowRank(torch.randn(2, 32), torch.randn(32, 2), 1.0)}]
    )
    with torch.inference_mode():
        for position, (_, chunk) in zip((5, 9), chunks):
            context = chunk[None].clone()
            k = projection(forge, layer, "k", context)
            got = rewriter.rewrite((layer, "k"), context, k.clone())
            changed = (got != k).any(-1)[0].nonzero().flatten().tolist()
            assert changed == [position]


def test_a_concept_that_encodes_to_nan_is_refused(forge):
    engine = forge.model.text_processing_engine
    nan = sd_hijack.Embedding(torch.full((1, 32), float("nan")), "broken")
    engine.embeddings.register_embedding(nan, engine.tokenize(["broken"])[0])
    p = generate(ForgeProcessing(["a photo of broken"], steps=1), script_args(["broken", "cat", "", 1.0]))
    assert "'broken' encodes to values that are not finite" in p.extra_generation_params["AlignIT warning"]
    assert p.prompts == ["a photo of broken"]


def test_source_choices_come_from_the_engine_the_lora_list_and_the_folder(forge):
    assert forge_flow.HOST.source_choices() == ["sks", "lora:loha", "lora:ohwx_lora", "cd:mycat"]


def context_recorder(calls: list):
    """An earlier extension's attn2 patches: one notes each block's context, one records the k/v handed to it (after
    AlignIT's rewrite, which wraps it) as ``((layer, proj), context, output)``."""

    def hook(p):
        unet = p.sd_model.forge_objects.unet.clone()
        contexts: list = []
        unet.set_model_attn2_patch(lambda n, context, value, extra: (contexts.append(context), (n, context, value))[1])
        for layer, _ in attn2_modules(unet.model.diffusion_model):
            name, number, _index = block_key(layer)

            def replace(q, k, v, extra_options, layer=layer):
                calls.extend([((layer, "k"), contexts[-1], k.clone()), ((layer, "v"), contexts[-1], v.clone())])
                return attention.attention_function(q, k, v, extra_options["n_heads"])

            unet.set_model_attn2_replace(replace, name, number)
        p.sd_model.forge_objects.unet = unet

    return hook


def run_batch(prompts, *rows, enabled=True):
    calls: list = []
    forge_flow.ForgeProcessing.cached_c = [None, None, None]
    forge_flow.ForgeProcessing.cached_uc = [None, None, None]
    forge_flow.ForgeProcessing.cached_hr_c = [None, None, None]
    p = ForgeProcessing(prompts, steps=1, batch_size=2, negative=kv_checks.NEGATIVE, hr_prompts=prompts, hr_steps=1)
    p = generate(p, script_args(*rows, enabled=enabled), earlier=[context_recorder(calls)])
    return p, calls


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_only_the_concept_rows_of_the_prompt_holding_it_change(forge, strength):
    """As on A1111 (test_a1111_weights.py): a batch with and without the trigger, an AND part without it, a negative
    prompt sharing the prefix, first and hires passes; only the concept's row differs from AlignIT off."""
    _, off = run_batch(kv_checks.PLAIN, LORA, enabled=False)
    _, full = run_batch(kv_checks.PROMPTS, LORA[:3] + [1.0])
    p, on = run_batch(kv_checks.PROMPTS, LORA[:3] + [strength])
    assert "AlignIT warning" not in p.extra_generation_params
    assert len(on) == 2 * 32  # first pass and hires pass
    kv_checks.check_against_plain(
        on,
        off,
        strength,
        kv_checks.concept_row(full, off),
        lambda key: attn2_modules(forge.unet)[key].weight,
        lambda key, x: (
            LowRank(forge.factors[key][0], forge.factors[key][1], float(forge.factors[key][2]) / 2).times(0.8).delta(x)
        ),
    )


def test_the_lora_file_cache_keeps_only_the_parts_alignit_uses(tmp_path):
    from alignit.hosts.webui import forge_sources

    kept = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.alpha",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha",
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight",
    }
    dropped = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k.lora_down.weight",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q.lora_down.weight",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
    }
    save_file({key: torch.zeros(2) for key in kept | dropped}, str(tmp_path / "mixed.safetensors"))
    assert set(forge_sources._tensors(str(tmp_path / "mixed.safetensors"))) == kept
