"""``alignit evaluate`` with its default generator, the diffusers host, on a tiny SD1.5 pipeline saved to disk: the
two images of a job come from the same seed, differ (AlignIT off and on), and are scored."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers_parts import IMAGE_SIZE, TEXT_WIDTH, saved_pipeline
from evaluate_parts import save_tiny_clip, save_tiny_dino, write_references
from PIL import Image

from alignit.cli import main


def test_evaluate_with_the_diffusers_host(tmp_path):
    model = saved_pipeline("sd15", tmp_path / "pipelines")
    torch.save({"<cat-toy>": torch.randn(TEXT_WIDTH, generator=torch.Generator().manual_seed(2))}, tmp_path / "toy.bin")
    write_references(tmp_path / "refs", 2, 1)
    (tmp_path / "concepts.yaml").write_text(
        "concepts:\n  - name: toy\n    source: toy.bin\n    trigger: <cat-toy>\n    class_word: toy\n"
        "    references: refs\n    prompts:\n      - 'a {} playing badminton in a garden'\n"
    )
    out = tmp_path / "out"
    arguments = ["evaluate", "--concepts", str(tmp_path / "concepts.yaml"), "--out", str(out), "--seeds", "1"]
    arguments += ["--model", str(model), "--steps", "2", "--size", str(IMAGE_SIZE), "--device", "cpu", "--bootstrap", "50"]
    arguments += ["--clip-model", str(save_tiny_clip(tmp_path / "clip")), "--dino-model", str(save_tiny_dino(tmp_path / "dino"))]
    assert main(arguments) == 0
    (job,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert job["status"] == "done", job
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 2
    off, on = (np.asarray(Image.open(path)) for path in images)
    assert off.shape == on.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and not np.array_equal(off, on)
    assert (out / "summary.csv").exists() and (out / "report.html").exists()
