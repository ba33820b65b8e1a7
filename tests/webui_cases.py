"""End-to-end cases run against each real WebUI (test_a1111_integration.py, test_forge_integration.py import them
and give the ``webui`` fixture: the URL of a started WebUI with the test sources of ``webui_server``, and
``hires_extra``: what that WebUI's API needs besides A1111's hires fields).

What they show on the real WebUI: the layout AlignIT computes matches the WebUI's ``tokenize_line`` and the marked
prompts match its real prompt parser for every tricky prompt (AlignIT would otherwise warn and step aside); an
AlignIT run changes the image while a plain run before and after it gives the same bytes (no cache poisoning, no
hook or patch left); weight-side concepts reach every cross-attention layer (no "never reached" warning); bad
concepts warn and still render; the X/Y/Z axes exist under ``--nowebui``."""

import base64
import json
import urllib.error

import pytest
from webui_server import CD, EMBEDDING, LORA, LORA_DIFFUSERS, call, on, txt2img


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
