"""End to end against a real AUTOMATIC1111 WebUI (v1.10), started here, through its API.

Skipped unless ``ALIGNIT_A1111_DIR`` names a WebUI folder that starts offline on the CPU. ``ALIGNIT_A1111_PYTHON``
is the Python to start it with (default: the folder's ``venv/bin/python``), ``ALIGNIT_A1111_ARGS`` adds launch
arguments (a ``--ckpt`` for instance). The test links this checkout into the WebUI's ``extensions/`` and writes a
test embedding into its ``embeddings/``, and removes both afterwards.

What it shows on the real WebUI: the layout AlignIT computes matches ``tokenize_line`` and the marked prompts match
the real prompt parser for every tricky prompt (AlignIT would otherwise warn and step aside); an AlignIT run changes
the image while a plain run before and after it gives the same bytes (no cache poisoning); bad concepts warn and
still render; the X/Y/Z axes exist under ``--nowebui``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WEBUI = os.environ.get("ALIGNIT_A1111_DIR")
pytestmark = pytest.mark.skipif(not WEBUI, reason="ALIGNIT_A1111_DIR is not set")

EMBEDDING = "alignit_test_sks"
LORA = "alignit_test_lora"
CD = "alignit_test_cd"
# SD1.5's cross-attention layers and their widths (configs/v1-inference.yaml: 320 channels, mult 1, 2, 4, 4)
SD15_ATTN2 = {
    **{f"input_blocks.{i}.1": w for i, w in [(1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280)]},
    "middle_block.1": 1280,
    **{f"output_blocks.{i}.1": w for i, w in [(3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640)]},
    **{f"output_blocks.{i}.1": 320 for i in (9, 10, 11)},
}
BASE = {"steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler", "cfg_scale": 7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, path: str, payload: dict | None = None, timeout: float = 600) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    folder = Path(WEBUI)
    python = os.environ.get("ALIGNIT_A1111_PYTHON", str(folder / "venv" / "bin" / "python"))
    link = folder / "extensions" / "alignit"
    embedding = folder / "embeddings" / f"{EMBEDDING}.safetensors"
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    save_file({"emb_params": torch.randn(2, 768, generator=generator) * 0.3}, str(embedding))
    lora, delta = folder / "models" / "Lora" / f"{LORA}.safetensors", folder / "models" / "CustomDiffusion" / f"{CD}.bin"
    lora.parent.mkdir(parents=True, exist_ok=True)
    delta.parent.mkdir(parents=True, exist_ok=True)
    lora_tensors, cd_tensors = {}, {}
    for block, width in SD15_ATTN2.items():
        for proj in "kv":
            name = f"lora_unet_{block.replace('.', '_')}_transformer_blocks_0_attn2_to_{proj}"
            lora_tensors[f"{name}.lora_down.weight"] = torch.randn(4, 768, generator=generator) * 0.2
            lora_tensors[f"{name}.lora_up.weight"] = torch.randn(width, 4, generator=generator) * 0.2
            lora_tensors[f"{name}.alpha"] = torch.tensor(4.0)
            cd_tensors[f"model.diffusion_model.{block}.transformer_blocks.0.attn2.to_{proj}.weight"] = (
                torch.randn(width, 768, generator=generator) * 0.05
            )
    save_file(lora_tensors, str(lora))
    torch.save({"state_dict": cd_tensors | {"embed": torch.randn(1, 768, generator=generator) * 0.3}}, delta)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    log = Path(os.environ.get("ALIGNIT_A1111_LOG", tmp_path_factory.mktemp("a1111") / "server.log"))
    command = [
        python,
        "launch.py",
        "--skip-prepare-environment",
        "--skip-torch-cuda-test",
        "--use-cpu",
        "all",
        "--no-half",
        "--api",
        "--nowebui",
        "--disable-nan-check",
        "--port",
        str(port),
        *os.environ.get("ALIGNIT_A1111_ARGS", "").split(),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                _call(url, "/sdapi/v1/options", timeout=10)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the WebUI did not start; see {log}:\n{log.read_text()[-3000:]}")
                time.sleep(3)
        _call(url, "/sdapi/v1/options", {"live_previews_enable": False, "emphasis": "Original"})
        _call(url, "/sdapi/v1/refresh-embeddings", {})
        _call(url, "/sdapi/v1/refresh-loras", {})
        yield url
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        link.unlink()
        for path in (embedding, lora, delta):
            path.unlink()


def txt2img(url: str, prompt: str, alignit: list | None = None, **extra) -> tuple[bytes, dict]:
    payload = dict(BASE, prompt=prompt, **extra)
    if alignit is not None:
        payload["alwayson_scripts"] = {"AlignIT": {"args": alignit}}
    result = _call(url, "/sdapi/v1/txt2img", payload)
    return base64.b64decode(result["images"][0]), json.loads(result["info"])


def on(*rows, **settings) -> list:
    return [dict({"enabled": True, "concepts": [list(row) for row in rows]}, **settings)]


def test_the_embedding_and_the_script_are_loaded(webui):
    assert EMBEDDING in _call(webui, "/sdapi/v1/embeddings")["loaded"]
    assert "alignit" in [name.lower() for name in _call(webui, "/sdapi/v1/scripts")["txt2img"]]


def test_alignit_changes_the_image_and_leaves_no_trace(webui):
    before, _ = txt2img(webui, "a cat playing badminton in a garden")
    aligned, info = txt2img(webui, "a <sks> playing badminton in a garden", on(("<sks>", "cat", EMBEDDING)))
    after, _ = txt2img(webui, "a cat playing badminton in a garden")
    off, _ = txt2img(webui, "a cat playing badminton in a garden", [False])
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert 'AlignIT: "[[' in info["infotexts"][0]
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
    assert 'AlignIT: "[[' in info["infotexts"][0]


@pytest.mark.parametrize("scope", ["kv", "full"])
def test_lora_concept(webui, scope):
    """No warning also means the K/V hooks met the concept rows in every layer under A1111's own sampler."""
    before, _ = txt2img(webui, "a photo of a man playing badminton")
    image, info = txt2img(webui, "a photo of ohwx playing badminton", on(("ohwx", "man", f"lora:{LORA}:0.8"), lora_scope=scope))
    after, _ = txt2img(webui, "a photo of a man playing badminton")
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert image != before and after == before
    assert ("Lora hashes" in info["infotexts"][0]) == (scope == "full")


def test_custom_diffusion_concept_mixed_with_an_embedding(webui):
    rows = (("<new1> cat", "cat", f"cd:{CD}"), ("<sks>", "dog", EMBEDDING))
    _, info = txt2img(webui, "a <new1> cat and a <sks> playing badminton", on(*rows))
    assert "AlignIT warning" not in info["infotexts"][0], info["infotexts"][0]
    assert f"cd:{CD}" in info["infotexts"][0]


def test_hires_pass(webui):
    _, info = txt2img(
        webui,
        "a <sks> playing badminton",
        on(("<sks>", "cat", EMBEDDING), step_start=0.0, step_end=0.5),
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent",
        hr_second_pass_steps=2,
        denoising_strength=0.5,
        hr_prompt="a <sks> playing badminton in the snow",
    )
    assert "AlignIT warning" not in info["infotexts"][0] and "AlignIT steps: 0-0.5" in info["infotexts"][0]


def test_bad_concept_warns_and_renders(webui):
    image, info = txt2img(webui, "a <nope> on a sofa", on(("<nope>", "cat", "")))
    assert image
    assert "no embedding named" in info["infotexts"][0]


def test_xyz_axes_exist_without_the_ui(webui):
    scripts = _call(webui, "/sdapi/v1/script-info")
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = next(arg["choices"] for arg in xyz["args"] if arg["label"] == "X type")
    assert {"[AlignIT] Enabled", "[AlignIT] Strength (all concepts)", "[AlignIT] Class word"} <= set(labels)
