"""``alignit generate`` end to end on a tiny SD1.5 pipeline saved to disk: the files it writes, the comparison
grid, the standard example (its hub files served from a local folder), and bad input: one line, exit status 2."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers_parts import IMAGE_SIZE, TEXT_WIDTH, saved_pipeline
from PIL import Image

from alignit.cli import EXAMPLE_PROMPT, main, parse_concept
from alignit.concepts import Concept

ROOT = Path(__file__).resolve().parents[1]
BASE = ["generate", "--steps", "2", "--size", str(IMAGE_SIZE), "--device", "cpu", "--seed", "7"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return saved_pipeline("sd15", tmp_path_factory.mktemp("pipelines"))


@pytest.fixture
def embedding(tmp_path):
    torch.save(
        {"<cat-toy>": torch.randn(TEXT_WIDTH, generator=torch.Generator().manual_seed(2))}, tmp_path / "learned_embeds.bin"
    )
    return tmp_path / "learned_embeds.bin"


def test_parse_concept():
    assert parse_concept("<sks>=cat") == Concept("<sks>", "cat")
    assert parse_concept("<sks>=cat:emb.pt") == Concept("<sks>", "cat", "emb.pt")
    assert parse_concept("<sks>=cat:emb.pt:0.5") == Concept("<sks>", "cat", "emb.pt", 0.5)
    assert parse_concept("ohwx=man:lora:x.safetensors:0.8") == Concept("ohwx", "man", "lora:x.safetensors", 0.8)
    assert parse_concept("ohwx=man:lora:x.safetensors:0.8:1.5") == Concept("ohwx", "man", "lora:x.safetensors:0.8", 1.5)
    assert parse_concept(r"<sks>=cat:C:\models\emb.pt") == Concept("<sks>", "cat", r"C:\models\emb.pt")


def test_generate_with_compare(model, embedding, tmp_path, capsys):
    out = tmp_path / "out"
    prompt = "a <cat-toy> playing badminton in a garden"
    args = [*BASE, "--model", str(model), "--concept", f"<cat-toy>=toy:{embedding}", "--prompt", prompt, "--out", str(out)]
    assert main([*args, "--compare", "--negative-prompt", "blurry, dark"]) == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == ["00001-7-alignit.png", "00001-7-compare.png", "00001-7-plain.png"]
    assert capsys.readouterr().out.split() == [
        str(out / name) for name in ("00001-7-plain.png", "00001-7-alignit.png", "00001-7-compare.png")
    ]
    aligned, plain, grid = (Image.open(out / f"00001-7-{kind}.png") for kind in ("alignit", "plain", "compare"))
    lines = aligned.text["parameters"].split("\n")
    assert lines[:2] == [prompt, "Negative prompt: blurry, dark"]
    assert lines[2].startswith("Steps: 2, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: 7, Size: 32x32, Model: ")
    assert lines[2].endswith(f'AlignIT 1: "<cat-toy> → toy, source: {embedding}"')
    assert "AlignIT" not in plain.text["parameters"]
    assert aligned.size == plain.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert grid.size[0] == 2 * IMAGE_SIZE and grid.size[1] > IMAGE_SIZE
    halves = np.asarray(grid)[:IMAGE_SIZE]
    assert np.array_equal(halves[:, :IMAGE_SIZE], np.asarray(plain)) and np.array_equal(
        halves[:, IMAGE_SIZE:], np.asarray(aligned)
    )
    assert not np.array_equal(np.asarray(plain), np.asarray(aligned))

    assert main(args) == 0  # no --compare: the AlignIT image alone, numbered after the earlier ones
    assert sorted(path.name for path in out.iterdir())[-1] == "00002-7-alignit.png"


def test_the_standard_example(model, embedding, tmp_path, monkeypatch):
    """No concept: the cat-toy embedding from sd-concepts-library on the badminton prompt, compared."""
    asked = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kwargs: asked.append(repo) or ["learned_embeds.bin"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kwargs: str(embedding))
    assert main([*BASE, "--model", str(model), "--out", str(tmp_path / "out")]) == 0
    assert set(asked) == {"sd-concepts-library/cat-toy"}
    grid = Image.open(tmp_path / "out" / "00001-7-compare.png")
    assert grid.text["parameters"].startswith(EXAMPLE_PROMPT)


def hostile(folder: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(folder / "code ran"),))

    with open(folder / "evil.bin", "wb") as file:
        pickle.dump({"<x>": Payload()}, file)
    return folder / "evil.bin"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing file", "no file or folder"),
        ("missing file, unknown model", "no file or folder"),
        ("no source", "no file or folder '<cat-toy>'"),
        ("unknown model", "no model folder"),
        ("not a model", "cannot load the model"),
        ("trigger absent", "the trigger '<cat-toy>' is not in the prompt"),
        ("hostile pickle", "cannot read evil.bin"),
        ("bad concept", "write it as TRIGGER=CLASS"),
        ("out is a file", "a file is in the way"),
        ("no prompt", "--prompt is needed"),
        ("strength", "strength must lie in [0, 2]"),
    ],
)
def test_bad_input_is_one_line_and_status_2(case, message, model, embedding, tmp_path, capsys):
    concept, prompt, model_arg, out = f"<cat-toy>=toy:{embedding}", "a <cat-toy> in a garden", str(model), tmp_path / "out"
    if case.startswith("missing file"):
        concept = f"<cat-toy>=toy:{tmp_path / 'nothing.bin'}"
        model_arg = str(tmp_path / "no-such-model") if "model" in case else model_arg
    elif case == "no source":
        concept = "<cat-toy>=toy"
    elif case == "unknown model":
        model_arg = str(tmp_path / "no-such-model")
    elif case == "not a model":
        model_arg = str(tmp_path)
    elif case == "trigger absent":
        prompt = "a toy in a garden"
    elif case == "hostile pickle":
        concept = f"<cat-toy>=toy:{hostile(tmp_path)}"
    elif case == "bad concept":
        concept = "<cat-toy>:toy"
    elif case == "out is a file":
        out.write_text("")
    elif case == "strength":
        concept += ":3"
    args = [*BASE, "--model", model_arg, "--concept", concept, "--out", str(out)]
    assert main(args if case == "no prompt" else [*args, "--prompt", prompt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alignit: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "code ran").exists()
    assert not out.is_dir() or not list(out.iterdir())


def test_python_dash_m(tmp_path):
    """``python -m alignit``: the same command, the same exit status, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (tmp_path / "e.bin").write_bytes(b"")
    concept = f"a=b:{tmp_path / 'e.bin'}"
    result = subprocess.run(
        [sys.executable, "-m", "alignit", "generate", "--model", str(tmp_path / "none"), "--concept", concept, "--prompt", "a"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"alignit: no model folder '{tmp_path / 'none'}'"
    assert "Traceback" not in result.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "alignit", "generate", "--size", "33"], cwd=ROOT, capture_output=True, text=True
    )
    assert usage.returncode == 2 and "multiples of 8" in usage.stderr


def test_image_generator(model, embedding):
    """The evaluation's entry: one concept, the model loaded once, an image per (prompt, seed, aligned)."""
    from types import SimpleNamespace

    from alignit.hosts.diffusers import image_generator

    size = {"width": IMAGE_SIZE, "height": IMAGE_SIZE}
    settings = SimpleNamespace(model=str(model), steps=2, guidance=7.5, device="cpu", dtype="float32", negative_prompt="", **size)
    concept = SimpleNamespace(trigger="<cat-toy>", class_word="toy", source=str(embedding), strength=1.0)
    generator = image_generator(concept, settings)
    prompt = "a <cat-toy> in a garden"
    aligned, again, plain = (generator.generate(prompt, 3, flag) for flag in (True, True, False))
    assert aligned.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(np.asarray(aligned), np.asarray(again))
    assert not np.array_equal(np.asarray(aligned), np.asarray(plain))
