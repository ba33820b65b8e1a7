"""AlignIT on diffusers pipelines, held against the paper's definition with diffusers' own customization.

For every cross-attention layer, the k and v a processor set before AlignIT receives are captured in three runs with
the same seed: (a) AlignIT on, prompt with the trigger; (b) the base pipeline on p (trigger → class word); (c) the
pipeline customized by diffusers itself (``load_textual_inversion``, ``load_lora_weights``, Custom Diffusion
processors) on p' (every word of p a placeholder ``*``, the class word the concept). Then the concept rows of (a)
are those of (c), every other cond row of (a) is (b)'s bit for bit, and the uncond rows (negative prompt) are (b)'s.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers_parts import (
    TEXT_WIDTH,
    load_pipeline,
    load_sdxl_embedding,
    lora_state,
    record_cross_attention,
    record_custom_diffusion,
    saved_pipeline,
    set_custom_diffusion,
    text_lora_factors,
)
from safetensors.torch import save_file
from weight_files import cd_state, random_cd_weights, random_factors

from alignit.concepts import Concept
from alignit.hosts.diffusers import AlignIT
from alignit.kv_hooks import attn2_modules

CALL = {"num_inference_steps": 1, "guidance_scale": 5.0, "negative_prompt": "blurry", "output_type": "latent"}
WORDS = "a photo of {} playing"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: saved_pipeline(kind, root) for kind in ("sd15", "sdxl")}


def run(pipe, generate) -> list:
    """The recorded cross-attention calls of one generation (seed 0)."""
    calls = record_cross_attention(pipe.unet)
    generate(generator=torch.Generator().manual_seed(0), **CALL)
    return calls


def dummy(concept_text: str) -> str:
    """p' as the paper writes it: each word of p a ``*``, the class word the concept."""
    before, after = WORDS.split("{}")
    return " ".join(["*"] * len(before.split()) + [concept_text] + ["*"] * len(after.split()))


def check(on: list, base: list, custom: list, rows: list[tuple[str, int]], strength: float = 1.0) -> None:
    """``rows[r]`` says where cond row r of (a) comes from: ``("b", i)`` or ``("c", i)`` (the concept's)."""
    assert len(on) == len(base) == len(custom) > 0
    for (layer, _, *kv_a), (layer_b, _, *kv_b), (layer_c, _, *kv_c) in zip(on, base, custom):
        assert layer == layer_b == layer_c
        for a, b, c in zip(kv_a, kv_b, kv_c):
            assert torch.equal(a[0], b[0]), f"{layer}: the uncond rows changed"
            for row, (source, index) in enumerate(rows):
                if source == "b":
                    assert torch.equal(a[1, row], b[1, index]), (layer, row)
                else:
                    want = torch.lerp(b[1, index], c[1, index], strength)
                    torch.testing.assert_close(a[1, row], want, rtol=1e-5, atol=1e-5, msg=f"{layer} row {row}")


def same_rows(concept_rows: range) -> list[tuple[str, int]]:
    return [("c" if row in concept_rows else "b", row) for row in range(77)]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_embedding_rows_are_the_customized_pipelines(models, kind, tmp_path):
    generator = torch.Generator().manual_seed(5)
    vectors = {key: torch.randn(1, TEXT_WIDTH, generator=generator) for key in ("clip_l", "clip_g")}
    if kind == "sd15":
        torch.save({"<sks>": vectors["clip_l"][0]}, tmp_path / "learned_embeds.bin")
    else:
        save_file(vectors, str(tmp_path / "learned_embeds.safetensors"))
    pipe = load_pipeline(models[kind])
    aligned = AlignIT(pipe, [Concept("<sks>", "toy", str(tmp_path))])
    on = run(pipe, lambda **call: aligned(WORDS.format("<sks>"), **call))
    base = run(pipe, lambda **call: pipe(WORDS.format("toy"), **call))
    if kind == "sd15":
        pipe.load_textual_inversion(tmp_path / "learned_embeds.bin")
    else:
        load_sdxl_embedding(pipe, "<sks>", vectors)
    custom = run(pipe, lambda **call: pipe(dummy("<sks>"), **call))
    check(on, base, custom, same_rows(range(4, 5)))


def test_a_longer_embedding_takes_rows_from_the_padding(models, tmp_path):
    """Two vectors for a one-token class word: the rows after it move down one, the padding row before the final
    EOS goes."""
    torch.save({"<sks>": torch.randn(2, TEXT_WIDTH, generator=torch.Generator().manual_seed(6))}, tmp_path / "two.bin")
    pipe = load_pipeline(models["sd15"])
    aligned = AlignIT(pipe, [Concept("<sks>", "toy", str(tmp_path / "two.bin"))])
    on = run(pipe, lambda **call: aligned(WORDS.format("<sks>"), **call))
    base = run(pipe, lambda **call: pipe(WORDS.format("toy"), **call))
    pipe.load_textual_inversion(tmp_path / "two.bin")
    custom = run(pipe, lambda **call: pipe(dummy("<sks>"), **call))
    rows = [("b", i) for i in range(4)] + [("c", 4), ("c", 5)] + [("b", i) for i in range(5, 75)] + [("b", 76)]
    check(on, base, custom, rows)


@pytest.mark.parametrize(("kind", "scheme", "strength"), [("sd15", "kohya", 1.0), ("sd15", "peft", 0.5), ("sdxl", "kohya", 1.0)])
def test_lora_rows_are_the_customized_pipelines(models, kind, scheme, strength, tmp_path):
    pipe = load_pipeline(models[kind])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    state = lora_state(random_factors(pipe.unet), [text_lora_factors(e, seed=i + 1) for i, e in enumerate(encoders)], scheme)
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    weights_before = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    aligned = AlignIT(pipe, [Concept("ohwx", "toy", f"lora:{tmp_path}", strength)])
    on = run(pipe, lambda **call: aligned(WORDS.format("ohwx"), **call))
    assert all(torch.equal(value, weights_before[name]) for name, value in pipe.unet.state_dict().items())
    base = run(pipe, lambda **call: pipe(WORDS.format("toy"), **call))
    pipe.load_lora_weights(str(tmp_path))
    custom = run(pipe, lambda **call: pipe(dummy("ohwx"), **call))
    check(on, base, custom, same_rows(range(4, 5)), strength)


@pytest.mark.parametrize(("kind", "scheme"), [("sd15", "diffusers"), ("sd15", "delta_bin"), ("sdxl", "diffusers")])
def test_custom_diffusion_rows_are_the_customized_pipelines(models, kind, scheme, tmp_path):
    """SD1.5 with a modifier token (``<new1> toy``), SDXL without one (modifier tokens are refused there)."""
    pipe = load_pipeline(models[kind])
    weights = random_cd_weights(pipe.unet, scale=0.05)
    modifier = torch.randn(1, TEXT_WIDTH, generator=torch.Generator().manual_seed(9))
    folder = tmp_path / "cd"
    folder.mkdir()
    if scheme == "diffusers":
        torch.save(cd_state(weights, modifier, "diffusers"), folder / "pytorch_custom_diffusion_weights.bin")
        if kind == "sd15":
            torch.save({"<new1>": modifier[0]}, folder / "<new1>.bin")
    else:
        torch.save(cd_state(weights, modifier, "delta_bin"), folder / "delta.bin")
    trigger = "<new1> toy" if kind == "sd15" else "ohwx toy"
    aligned = AlignIT(pipe, [Concept(trigger, "stuffed toy", f"cd:{folder}")])
    on = run(pipe, lambda **call: aligned(WORDS.format(trigger), **call))
    base = run(pipe, lambda **call: pipe(WORDS.format("stuffed toy"), **call))

    set_custom_diffusion(pipe.unet, weights)
    if kind == "sd15":
        pipe.load_textual_inversion(modifier[0], token="<new1>")
    calls = record_custom_diffusion(pipe.unet)
    pipe(dummy(trigger), generator=torch.Generator().manual_seed(0), **CALL)
    check(on, base, calls, same_rows(range(4, 6)))


def test_processors_and_weights_are_as_before(models, tmp_path):
    """The processor set before AlignIT ran (and received the rewritten k/v above); after the call every processor
    is the same object, no hook is left anywhere, no weight changed; the image is the one AttnProcessor2_0 gives."""
    pipe = load_pipeline(models["sd15"])
    state = lora_state(random_factors(pipe.unet), [text_lora_factors(pipe.text_encoder)], "kohya")
    save_file(state, str(tmp_path / "concept.safetensors"))
    aligned = AlignIT(pipe, [Concept("ohwx", "toy", str(tmp_path / "concept.safetensors"))])
    weights = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    calls = record_cross_attention(pipe.unet)
    processors = dict(pipe.unet.attn_processors)
    recorded = aligned(WORDS.format("ohwx"), generator=torch.Generator().manual_seed(0), **CALL).images
    assert len(calls) == 16
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in processors.items())
    modules = [*pipe.unet.modules(), *pipe.text_encoder.modules()]
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in modules)
    assert all(torch.equal(value, weights[name]) for name, value in pipe.unet.state_dict().items())

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    default = aligned(WORDS.format("ohwx"), generator=torch.Generator().manual_seed(0), **CALL).images
    torch.testing.assert_close(default, recorded, rtol=1e-4, atol=1e-5)
    plain = pipe(WORDS.format("toy"), generator=torch.Generator().manual_seed(0), **CALL).images
    assert not torch.allclose(default, plain, atol=1e-4)


def test_hooks_come_off_when_the_pipeline_fails(models, tmp_path):
    torch.save({"w": torch.randn(2, 2)}, tmp_path / "x.bin")
    pipe = load_pipeline(models["sd15"])
    save_file(lora_state(random_factors(pipe.unet), [], "kohya"), str(tmp_path / "lora.safetensors"))
    aligned = AlignIT(pipe, [Concept("ohwx", "toy", f"lora:{tmp_path / 'lora.safetensors'}")])

    def stop(*args, **kwargs):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        aligned(WORDS.format("ohwx"), callback_on_step_end=stop, **CALL)
    assert not any(module._forward_hooks for module in attn2_modules(pipe.unet).values())
