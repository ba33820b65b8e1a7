"""End-to-end cases run against each real WebUI (test_a1111_integration.py, test_forge_integration.py import them
and give the ``webui`` fixture: the URL of a started WebUI with the test sources of ``webui_server``, and
``hires_extra``: what that WebUI's API needs besides A1111's hires fields).

What they show on the real WebUI: the layout AlignIT computes matches the WebUI's ``tokenize_line`` and the marked
prompts match its real prompt parser for every tricky prompt (AlignIT would otherwise warn and step aside); an
AlignIT run changes the image while a plain run before and after it gives the same bytes (no cache poisoning, no
hook or patch left); weight-side concepts reach every cross-attention layer (no "never reached" warning); bad
concepts warn and still render; the X/Y/Z axes exist under ``--nowebui``; and, through the test probe, the keys and
values the WebUI's attention receives with AlignIT on are, row for row, the ones the WebUI itself computes for the
class-word prompt p and, at the concept's rows, for p' with the LoRA applied by the WebUI. The modules that import
them give the ``webui_name`` fixture ("a1111" or "forge") where a WebUI's own abilities differ."""

import base64
import io
import json
import urllib.error

import pytest
import torch
from PIL import Image
from webui_server import (
    CD,
    EMBEDDING,
    EMBEDDING_OTHER,
    LORA,
    LORA_DIFFUSERS,
    LORA_OTHER,
    LYCORIS,
    REFINER,
    call,
    on,
    recorded_attention,
    txt2img,
    webui_layout,
)


def test_the_embedding_and_the_script_are_loaded(webui):
    assert EMBEDDING in call(webui, "/sdapi/v1/embeddings")["loaded"]
    assert "alignit" in [name.lower() for name in call(webui, "/sdapi/v1/scripts")["txt2img"]]


def test_alignit_changes_the_image_and_leaves_no_trace(webui):
    before, _ = txt2img(webui, "a cat playing badminton in a garden")
    aligned, info = txt2img(webui, "a <sks> playing badminton in a garden", on(("<sks>", "cat", EMBEDDING)))
    after, _ = txt2img(webui, "a cat playing badminton in a garden")
    off, _ = txt2img(webui, "a cat playing badminton in a garden", [False])
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert "AlignIT 1: " in info["infotexts"][0]
    assert info["prompt"] == "a <sks> playing badminton in a garden"
    assert aligned != before
    assert after == before and off == before


@pytest.mark.parametrize(
    "prompt",
    [
        "a (<sks>:1.3) playing [badminton], ((sharp focus))",
        "a [dog:<sks>:0.5] in a garden",
        "a [<sks>|dog] on a sofa",
        "a <sks> AND a garden :0.7",
        "a photo BREAK <sks> playing badminton",
        "my<sks>'s toy, " + ", ".join(["a detailed painting of a garden with flowers"] * 9) + ", <sks>",
        "alignit_test_sks and <sks> in the snow",
    ],
)
def test_webui_syntax_matches_the_real_parser_and_layout(webui, prompt):
    _, info = txt2img(webui, prompt, on(("<sks>", "cat", EMBEDDING)))
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert "AlignIT 1: " in info["infotexts"][0]


@pytest.mark.parametrize("scope", ["kv", "full"])
@pytest.mark.parametrize("lora", [LORA, LORA_DIFFUSERS])
def test_lora_concept(webui, lora, scope):
    """No warning also means the K/V rewriting met the concept rows in every layer under the WebUI's own sampler."""
    before, _ = txt2img(webui, "a photo of a man playing badminton")
    image, info = txt2img(webui, "a photo of ohwx playing badminton", on(("ohwx", "man", f"lora:{lora}:0.8"), lora_scope=scope))
    after, _ = txt2img(webui, "a photo of a man playing badminton")
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert image != before and after == before
    assert ("Lora hashes" in info["infotexts"][0]) == (scope == "full")


def test_custom_diffusion_concept_mixed_with_an_embedding(webui):
    rows = (("<new1> cat", "cat", f"cd:{CD}"), ("<sks>", "dog", EMBEDDING))
    _, info = txt2img(webui, "a <new1> cat and a <sks> playing badminton", on(*rows))
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert f"cd:{CD}" in info["infotexts"][0]


def test_hires_pass(webui, hires_extra):
    _, info = txt2img(
        webui,
        "a <sks> playing badminton",
        on(("<sks>", "cat", EMBEDDING), ("ohwx", "man", f"lora:{LORA}")),
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent",
        hr_second_pass_steps=2,
        denoising_strength=0.5,
        hr_prompt="a <sks> and ohwx playing badminton in the snow",
        **hires_extra,
    )
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]


def test_img2img(webui):
    image, _ = txt2img(webui, "a garden")
    extra = {"mode": "img2img", "init_images": [base64.b64encode(image).decode()], "denoising_strength": 0.6}
    before, _ = txt2img(webui, "a photo of a man in a garden", **extra)
    aligned, info = txt2img(webui, "a photo of ohwx in a garden", on(("ohwx", "man", f"lora:{LORA}")), **extra)
    after, _ = txt2img(webui, "a photo of a man in a garden", **extra)
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert aligned != before and after == before


def test_step_range(webui):
    _, info = txt2img(webui, "a <sks> playing badminton", on(("<sks>", "cat", EMBEDDING), step_start=0.0, step_end=0.5))
    assert "AlignIT warning" not in info["infotexts"][0] and "AlignIT steps: 0-0.5" in info["infotexts"][0]


def test_bad_concept_warns_and_renders(webui):
    image, info = txt2img(webui, "a <nope> on a sofa", on(("<nope>", "cat", "")))
    assert image
    assert "no embedding named" in info["infotexts"][0]


def test_xyz_axes_exist_without_the_ui(webui):
    scripts = call(webui, "/sdapi/v1/script-info")
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = next(arg["choices"] for arg in xyz["args"] if arg["label"] == "X type")
    assert {"[AlignIT] Enabled", "[AlignIT] Strength (all concepts)", "[AlignIT] Class word"} <= set(labels)


P = "a photo of man playing badminton"
# Tolerance of the concept rows, relative to the layer's largest key/value, by the coarsest of the dtype the attention
# received and the dtype the projection's weight is stored in: the WebUI merges the LoRA into the stored weight
# (W + ΔW, rounded to that dtype) where AlignIT adds ΔW·c' to W·c'. A few units of roundoff of the layer's scale
# (fp32 2^-24, fp16 2^-11, bf16 2^-8); seen on the real WebUIs: ~6e-7 with fp32 weights, ~2e-4 with fp16 ones.
CONCEPT_RTOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_lora_concept_keys_and_values_row_by_row(webui, tmp_path, strength):
    """(a) AlignIT on for "a photo of ohwx playing badminton" (LoRA concept, "kv" scope); (b) AlignIT off for p, the
    class-word prompt; (c) AlignIT off for p' written as a prompt ('*' for every other token of p, the trigger where
    the class word is, p's padding) with ``<lora:NAME:1>``, so that the WebUI applies the LoRA itself.

    Every UNet call, every cross-attention layer, keys and values: the uncond item of (a) is (b)'s, bit for bit; so
    is every cond row but the class word's; that row is (c)'s at strength 1 (within CONCEPT_RTOL of the layer's
    largest value) and (b)'s, bit for bit, at strength 0."""
    (p_chunk,) = webui_layout(webui, P)
    (word,) = webui_layout(webui, "man")
    row = p_chunk["tokens"].index(word["tokens"][1])
    length = p_chunk["tokens"].index(p_chunk["tokens"][-1])  # the first EOS
    p_prime = " ".join("ohwx" if i == row else "*" for i in range(1, length))
    (prime_chunk,) = webui_layout(webui, p_prime)
    (trigger,) = webui_layout(webui, "ohwx")
    assert prime_chunk["tokens"][row] == trigger["tokens"][1] and prime_chunk["tokens"].index(p_chunk["tokens"][-1]) == length

    info, aligned = recorded_attention(
        webui, tmp_path / "a.safetensors", "a photo of ohwx playing badminton", on(("ohwx", "man", f"lora:{LORA}", strength))
    )
    _, plain = recorded_attention(webui, tmp_path / "b.safetensors", P)
    _, concept = recorded_attention(webui, tmp_path / "c.safetensors", f"{p_prime} <lora:{LORA}:1>")
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert len(aligned.calls) == len(plain.calls) == len(concept.calls) > 0
    others = [i for i in range(len(p_chunk["tokens"])) if i != row]
    worst, weakest = 0.0, float("inf")
    for call_index, unet_call in enumerate(aligned.calls):
        assert unet_call["order"] == plain.calls[call_index]["order"] == concept.calls[call_index]["order"]
        keys = aligned.keys(call_index)
        assert keys == plain.keys(call_index) == concept.keys(call_index) and keys
        for key in keys:
            rtol = max(CONCEPT_RTOL[unet_call["dtype"]], CONCEPT_RTOL[aligned.weights[key]])
            where = f"UNet call {call_index}, {key}"
            if 1 in unet_call["order"]:
                assert torch.equal(aligned.rows(call_index, key, 1), plain.rows(call_index, key, 1)), f"{where}: uncond"
            if 0 not in unet_call["order"]:
                continue
            a, b, c = (record.rows(call_index, key, 0) for record in (aligned, plain, concept))
            assert torch.equal(a[others], b[others]), f"{where}: rows other than the class word's"
            if strength == 0.0:
                assert torch.equal(a[row], b[row]), f"{where}: the class word's row at strength 0"
                continue
            error = (a[row] - c[row]).abs().max().item() / c.abs().max().item()
            assert error <= rtol, f"{where}: the concept row is {error:.2e} (relative) from the WebUI's own p'"
            lora_effect = (c[row] - b[row]).abs().max().item() / c.abs().max().item()
            assert lora_effect > 10 * rtol, f"{where}: the LoRA barely changes the row ({lora_effect:.2e})"
            worst, weakest = max(worst, error), min(weakest, lora_effect)
    effect = f", smallest LoRA effect {weakest:.2e}" if strength else ""
    print(f"strength {strength}: {len(aligned.calls)} UNet calls, concept-row error {worst:.2e}{effect}")


def test_lycoris_concepts(webui, webui_name):
    """LoHa (with text parts), LoKr, (IA)³, DoRA, LoCon and a full diff on K/V, formed by the WebUI's own LoRA maths
    (Forge's loader does not read (IA)³: refused there)."""
    before, _ = txt2img(webui, "a photo of a man playing badminton")
    for kind, name in LYCORIS.items():
        image, info = txt2img(webui, "a photo of ohwx playing badminton", on(("ohwx", "man", f"lora:{name}:0.8")))
        text = info["infotexts"][0]
        if kind == "ia3" and webui_name == "forge":
            assert "(IA)³" in text, text
            continue
        assert "AlignIT warning" not in text, (kind, text)
        assert image != before, kind
    after, _ = txt2img(webui, "a photo of a man playing badminton")
    assert after == before


def test_sources_of_the_other_family_are_refused(webui):
    for row in (("<sks>", "cat", EMBEDDING_OTHER), ("ohwx", "man", f"lora:{LORA_OTHER}")):
        image, info = txt2img(webui, f"a photo of {row[0]} on a sofa", on(row))
        assert image and "made for another model" in info["infotexts"][0], info["infotexts"][0]


def test_the_refiner_gets_the_class_word_prompt(webui):
    """After the refiner switch the WebUI encodes the prompt anew with the refiner's text encoder: the class-word prompt,
    without the concept. With a refiner of the same weights (the checkpoint under another name) switching at 0.5 of 4
    steps, AlignIT's image is the one of AlignIT's step range 0-0.5 without a refiner, pixel for pixel."""
    if REFINER not in [model["model_name"] for model in call(webui, "/sdapi/v1/sd-models")]:
        pytest.skip("no refiner of the same weights for this model family")
    concept = on(("<sks>", "cat", EMBEDDING))
    settings = {"override_settings": {"refiner_switch_by_sample_steps": True}, "steps": 4}
    refiner = {"refiner_checkpoint": REFINER, "refiner_switch_at": 0.5}
    refined, info = txt2img(webui, "a <sks> playing badminton", concept, **settings, **refiner)
    ranged, _ = txt2img(webui, "a <sks> playing badminton", on(("<sks>", "cat", EMBEDDING), step_end=0.5), **settings)
    whole, _ = txt2img(webui, "a <sks> playing badminton", concept, **settings)
    assert "AlignIT does not reach the refiner" in info["infotexts"][0] and "Refiner: " in info["infotexts"][0]
    assert pixels(refined) == pixels(ranged) != pixels(whole)


def pixels(png: bytes) -> bytes:
    """An image's pixels, without its metadata (the infotext)."""
    return Image.open(io.BytesIO(png)).tobytes()


def test_class_word_suggestions_through_the_api(webui):
    """``POST /alignit/suggest`` for each kind of source: five words, best first, scores in [-1, 1]; bad requests are
    refused in one line."""
    for source in (EMBEDDING, f"lora:{LORA_DIFFUSERS}", f"cd:{CD}"):
        trigger = "<new1> cat" if source.startswith("cd:") else "<sks>"
        found = call(webui, "/alignit/suggest", {"trigger": trigger, "class_word": "corgi", "source": source})
        assert len(found) == 5 and all(set(item) == {"word", "score"} and -1 <= item["score"] <= 1 for item in found), found
        assert [item["score"] for item in found] == sorted((item["score"] for item in found), reverse=True)
    for payload, status, detail in [
        ({"trigger": "<sks>", "top": 0}, 422, "'top' must be a whole number"),
        ({"trigger": "<nope>"}, 400, "no embedding named '<nope>'"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            call(webui, "/alignit/suggest", payload)
        assert refused.value.code == status
        assert detail in json.loads(refused.value.read())["detail"]
