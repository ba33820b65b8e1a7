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

    save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(3)) * 0.3}, str(embedding))
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    log = tmp_path_factory.mktemp("a1111") / "server.log"
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
        yield url
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        link.unlink()
        embedding.unlink()


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
