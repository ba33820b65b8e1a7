"""The attention maps through both WebUI flows (A1111's forward hooks, Forge's attn2 patches) on a small ldm UNet of
SD1.5's layout, held against the definition computed here from the q and k each layer really used: DAAM's map of a
word is softmax(q·kᵀ/√d) of the image's cond rows, summed over heads and the word's token rows (each copy where Forge
tiles the context), each layer's h×w upsampled bilinearly to the latent, summed over the 1/2 and 1/4 levels and
the steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import networks
import pytest
import torch
import torch.nn.functional as F
from backend import attention
from forge_flow import FakeForgeModel, ForgeProcessing
from forge_flow import generate as forge_generate
from ldm_parts import tiny_sd15_unet, weights_digest
from modules import script_callbacks, sd_hijack, shared
from safetensors.torch import save_file
from webui_flow import FakeModel, Processing, generate, script_args
from weight_files import lora_state, random_factors, random_text_factors

from alignit.attn2_slots import block_key
from alignit.hosts.webui import a1111, a1111_maps, forge_maps, maps
from alignit.hosts.webui import args as alignit_args
from alignit.kv_hooks import attn2_modules

SKS = ["sks", "cat", "", 1.0]
LORA = ["ohwx", "man", "lora:ohwx_lora:0.8", 1.0]
# Every word one token: BOS a photo of a garden with badminton and <concept>: rows 2, 5, 7, then the concept's.
PROMPT = "a photo of a garden with badminton and {}"
ROWS = {"photo": [2], "garden": [5], "badminton": [7]}
LATENT = 8
RECORDED = {(LATENT // 2) ** 2: LATENT // 2, (LATENT // 4) ** 2: LATENT // 4}  # queries → side, at 1/2 and 1/4


def maps_args(*rows, maps_on=True, compare=False, words="", **settings) -> list:
    """The script's positional arguments with every concept row (the maps' follow them)."""
    empty = [["", "", "", 1.0]] * (alignit_args.ROWS - len(rows))
    return [*script_args(*rows, *empty, **settings), maps_on, compare, words]


def filled(unet: torch.nn.Module) -> torch.nn.Module:
    """A random ldm UNet outputs zero: its zero-initialised layers get small random values."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


@dataclass
class Call:
    """What one cross-attention layer computed with: q, k, heads, and which batch rows are cond rows."""

    layer: str
    q: torch.Tensor
    k: torch.Tensor
    heads: int
    cond: list[int]


@dataclass
class Host:
    name: str
    unet: torch.nn.Module
    run: Callable[..., Processing]  # (prompts, arguments, calls=None, **processing) → p


def _a1111_capture(unet: torch.nn.Module, calls: list[Call], uncond: torch.Tensor) -> list:
    """Forward hooks that keep what to_q/to_k return (after AlignIT's own K/V hooks) and each layer's context."""
    handles = []
    for name, module in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        kept: dict = {}
        handles.append(module.to_q.register_forward_hook(lambda m, i, out, kept=kept: kept.__setitem__("q", out)))
        handles.append(module.to_k.register_forward_hook(lambda m, i, out, kept=kept: kept.__setitem__("k", out)))

        def record(m, args, kwargs, out, kept=kept, name=name):
            context = kwargs["context"]
            cond = [r for r in range(len(context)) if not torch.equal(context[r, :77], uncond[0, :77])]
            calls.append(Call(name, kept["q"], kept["k"], m.heads, cond))

        handles.append(module.register_forward_hook(record, with_kwargs=True))
    return handles


def _forge_capture(calls: list[Call]):
    """An earlier extension's attn2 replace patches on every layer: they see q and k as the attention gets them."""

    def hook(p):
        unet = p.sd_model.forge_objects.unet.clone()
        for layer in attn2_modules(unet.model.diffusion_model):
            if layer[1] != "k":
                continue
            name, number, index = block_key(layer[0])

            def replace(q, k, v, extra, layer=layer[0]):
                size = q.shape[0] // len(extra["cond_or_uncond"])
                cond = [c * size + i for c, kind in enumerate(extra["cond_or_uncond"]) if kind == 0 for i in range(size)]
                calls.append(Call(layer, q, k, extra["n_heads"], cond))
                return attention.attention_function(q, k, v, extra["n_heads"])

            unet.set_model_attn2_replace(replace, name, number, index)
        p.sd_model.forge_objects.unet = unet

    return hook


@pytest.fixture(params=["a1111", "forge"])
def host(request, text_model, tokenizer, vectors, tmp_path, monkeypatch):
    unet = filled(tiny_sd15_unet())
    factors, text = random_factors(unet), random_text_factors(text_model)
    save_file(lora_state(factors, text, "kohya_ldm"), str(tmp_path / "ohwx_lora.safetensors"))
    aliases = {"ohwx_lora": SimpleNamespace(filename=str(tmp_path / "ohwx_lora.safetensors"))}
    monkeypatch.setattr(networks, "available_network_aliases", aliases)
    if request.param == "a1111":
        database = sd_hijack.EmbeddingDatabase()
        sd_hijack.model_hijack.embedding_db = database  # before the model: its encoder keeps the database it finds
        model = FakeModel(text_model, tokenizer, unet)
        monkeypatch.setattr(shared, "sd_model", model)
        database.register_embedding(sd_hijack.Embedding(vectors(2), "sks"), model.cond_stage_model.tokenize(["sks"])[0])
        Processing.cached_c, Processing.cached_uc = [None, None], [None, None]

        def run(prompts, arguments, calls=None, **settings):
            negative = settings.get("negative", "")
            uncond = model.get_learned_conditioning([negative])
            handles = _a1111_capture(unet, calls, uncond) if calls is not None else []
            try:
                return generate(Processing(prompts, **settings), arguments)
            finally:
                for handle in handles:
                    handle.remove()

        yield Host("a1111", unet, run)
        a1111.retire_hooks()
        a1111_maps.retire()
        return
    model = FakeForgeModel({"clip_l": text_model}, tokenizer, unet)
    monkeypatch.setattr(shared, "sd_model", model)
    engine = model.text_processing_engine
    engine.embeddings.register_embedding(sd_hijack.Embedding(vectors(2), "sks"), engine.tokenize(["sks"])[0])
    ForgeProcessing.cached_c, ForgeProcessing.cached_uc = [None, None, None], [None, None, None]

    def run_forge(prompts, arguments, calls=None, **settings):
        earlier = [_forge_capture(calls)] if calls is not None else []
        return forge_generate(ForgeProcessing(prompts, **settings), arguments, earlier=earlier)

    yield Host("forge", unet, run_forge)


def expected_maps(calls: list[Call], columns: list[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
    """The definition, per image (its cond rows are the calls' cond rows in image order; one AND part each)."""
    out: list[dict[str, torch.Tensor]] = [{word: torch.zeros(LATENT, LATENT) for word in words} for words in columns]
    for call in calls:
        queries = call.q.shape[1]
        if queries not in RECORDED:
            continue
        side = RECORDED[queries]
        for image, row in enumerate(call.cond):
            q, k = call.q[row].float(), call.k[row].float()
            dim = q.shape[-1] // call.heads
            qh, kh = q.view(queries, call.heads, dim).transpose(0, 1), k.view(-1, call.heads, dim).transpose(0, 1)
            probabilities = torch.softmax(qh @ kh.transpose(1, 2) / dim**0.5, dim=-1).sum(0)  # (queries, tokens)
            copies = k.shape[0] // 77
            for word, rows in columns[image].items():
                every = [r + 77 * copy for copy in range(copies) for r in rows]
                small = probabilities[:, every].sum(-1).view(1, 1, side, side)
                out[image][word] += F.interpolate(small, size=(LATENT, LATENT), mode="bilinear", align_corners=False)[0, 0]
    return out


def results(p) -> list[maps.ImageMaps]:
    return getattr(p, maps.MAPS_ATTRIBUTE).results


def assert_maps(p, want: list[dict[str, torch.Tensor]]) -> None:
    got = results(p)
    assert len(got) == len(want)
    for result, expected in zip(got, want):
        assert result.captions == list(expected)
        torch.testing.assert_close(result.maps, torch.stack(list(expected.values())), rtol=1e-4, atol=1e-5)


def test_a_word_whose_key_dominates_every_query_has_the_largest_map_everywhere(host):
    """By construction: every query is made nonnegative and "photo"'s key a large positive constant, in every layer, so
    "photo" takes nearly all of every query's attention."""
    handles = []
    for name, module in host.unet.named_modules():
        if name.endswith("attn2"):
            handles.append(module.to_q.register_forward_hook(lambda m, i, out: out.abs()))

            def dominate(m, i, out):
                out = out.clone()
                out[:, ROWS["photo"][0]] = 20 * out.abs().max()
                return out

            handles.append(module.to_k.register_forward_hook(dominate))
    try:
        p = host.run([PROMPT.format("sks")], maps_args(SKS), steps=2)
    finally:
        for handle in handles:
            handle.remove()
    (result,) = results(p)
    assert result.captions == ["cat", "photo", "garden", "badminton"]
    photo = result.maps[1]
    others = torch.cat([result.maps[:1], result.maps[2:]])
    assert (photo > others).all()
    assert "AlignIT warning" not in p.extra_generation_params
    assert p.extra_generation_params["AlignIT maps"] == "on"


@pytest.mark.parametrize(
    ("concept", "prompt", "rows"),
    [
        (SKS, PROMPT, {"cat": [9, 10], **ROWS}),  # the embedding's two vectors
        (LORA, PROMPT, {"man": [9], **ROWS}),  # the LoRA concept's row, with its rewritten keys
        # The splice gives the concept two rows where the class word had one: the words after it move down a row.
        (SKS, "a photo of {} in a garden with badminton", {"cat": [4, 5], "photo": [2], "garden": [8], "badminton": [10]}),
    ],
    ids=["embedding", "lora", "words-after-a-longer-splice"],
)
def test_maps_sum_as_defined(host, concept, prompt, rows):
    calls: list[Call] = []
    p = host.run([prompt.format(concept[0])], maps_args(concept), calls, steps=2)
    assert "AlignIT warning" not in p.extra_generation_params, p.extra_generation_params
    assert_maps(p, expected_maps(calls, [rows]))


def test_the_hires_pass_adds_to_the_maps(host):
    calls: list[Call] = []
    hires = [PROMPT.format("sks") + " in the snow"]
    p = host.run([PROMPT.format("sks")], maps_args(SKS), calls, steps=2, hr_prompts=hires, hr_steps=2)
    assert len(p.sampled) == 2 and len({call.layer for call in calls if call.q.shape[1] in RECORDED}) == 10
    assert "AlignIT warning" not in p.extra_generation_params, p.extra_generation_params
    assert_maps(p, expected_maps(calls, [{"cat": [9, 10], **ROWS}]))


def test_each_image_of_a_batch_gets_its_own_words_and_rows(host):
    """Two prompts in one batch, a negative prompt two chunks long: A1111 runs cond and uncond in separate calls, Forge
    tiles the cond to the uncond's length (each copy counts)."""
    calls: list[Call] = []
    prompts = [PROMPT.format("sks"), "a photo of a garden with sks"]
    p = host.run(prompts, maps_args(SKS), calls, steps=2, batch_size=2, negative=", ".join(["blurry"] * 60))
    assert {len(call.cond) for call in calls} == ({0, 2} if host.name == "a1111" else {2})
    assert_maps(p, expected_maps(calls, [{"cat": [9, 10], **ROWS}, {"cat": [7, 8], "photo": [2], "garden": [5]}]))


def test_words_named_by_the_user_and_maps_without_alignit(host):
    calls: list[Call] = []
    p = host.run([PROMPT.format("sks")], maps_args(SKS, enabled=False, words="garden, sks, nowhere"), calls, steps=1)
    assert p.alignit_state is None
    want = expected_maps(calls, [{"garden": [5], "sks": [9, 10], "nowhere": []}])  # the trigger as the WebUI encodes it
    assert_maps(p, want)
    assert p.extra_generation_params["AlignIT maps"] == "on, words: garden, sks, nowhere"


def test_off_installs_nothing(host, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a maps hook was installed")

    monkeypatch.setattr(a1111_maps.MapHooks, "__init__", refuse)
    monkeypatch.setattr(forge_maps.MapPatch, "install", refuse)
    p = host.run([PROMPT.format("sks")], maps_args(SKS, maps_on=False, compare=True), steps=1)
    assert getattr(p, maps.MAPS_ATTRIBUTE) is None
    assert "AlignIT maps" not in p.extra_generation_params
    assert p.processed.images == ["image 0"]


def _no_hooks(unet: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_compare_renders_the_plain_run_exactly_as_alignit_off(host):
    digest = weights_digest(host.unet)
    p = host.run([PROMPT.format("sks")], maps_args(SKS, compare=True), steps=2)
    session = getattr(p, maps.MAPS_ATTRIBUTE)
    plain = session.plain
    assert plain.all_prompts == [PROMPT.format("sks")]  # the trigger kept
    if host.name == "a1111":
        Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    else:
        ForgeProcessing.cached_c, ForgeProcessing.cached_uc = [None, None, None], [None, None, None]
    off = host.run([PROMPT.format("sks")], script_args(SKS, enabled=False), steps=2)
    assert len(plain.sampled[0]) == len(off.sampled[0]) == 4
    for a, b in zip(plain.sampled[0], off.sampled[0], strict=True):
        assert torch.equal(a, b)  # conditioning and UNet output of every step, bit for bit
    aligned = p.sampled[0][0] if host.name == "a1111" else p.sampled[0][1]
    assert not torch.equal(aligned, off.sampled[0][0] if host.name == "a1111" else off.sampled[0][1])

    images = p.processed.images
    assert images[0] == "image 0" and images[1] == "image 0" and len(images) == 3  # the image, the plain image, the grid
    grid = images[2]
    word_picture = session.results[0].image
    assert grid.width > 2 * word_picture.width and grid.height > 4 * word_picture.height  # 4 rows of 2
    assert p.processed.infotexts == ["info 0", "info 0", "info 0"]
    assert [r.captions for r in getattr(plain, maps.MAPS_ATTRIBUTE).results] == [["sks", "photo", "garden", "badminton"]]
    assert weights_digest(host.unet) == digest
    if host.name == "a1111":
        assert _no_hooks(host.unet) and not a1111_maps._live
    else:
        assert not shared.sd_model.forge_objects_original.unet.model_options["transformer_options"]


def test_maps_pictures_follow_each_image(host):
    p = host.run([PROMPT.format("sks"), PROMPT.format("sks")], maps_args(SKS), steps=1, batch_size=1)
    images = p.processed.images
    assert images[:2] == ["image 0", "image 1"] and len(images) == 2 + 2 * 4
    assert p.processed.infotexts[2:] == ["info 0"] * 4 + ["info 1"] * 4


def test_nothing_is_left_after_a_failed_generation(host):
    p_args = maps_args(LORA)
    with pytest.raises(RuntimeError):
        processing = Processing if host.name == "a1111" else ForgeProcessing
        p = processing([PROMPT.format("ohwx")], steps=3)
        p.fail_at_step = 1
        if host.name == "a1111":
            generate(p, p_args)
        else:
            forge_generate(p, p_args)
    later = host.run(["a photo of a garden"], script_args(SKS, enabled=False), steps=1)
    if host.name == "a1111":
        assert _no_hooks(host.unet) and not a1111_maps._live  # the next generation retired what the failure left
    assert getattr(later, maps.MAPS_ATTRIBUTE) is None


def test_one_callback_for_every_generation(host):
    for _ in range(2):
        host.run([PROMPT.format("sks")], maps_args(SKS), steps=1)
    assert script_callbacks.cfg_denoiser_callbacks.count(a1111_maps._on_denoiser) <= 1
