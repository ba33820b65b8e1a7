"""Sampling time with AlignIT on vs off for a text-side (embedding) concept, in one run, on full-size SD1.5 parts.

The UNet is SD1.5's (configs/v1-inference.yaml ``unet_config``) and the text encoder CLIP ViT-L/14's, both with
random weights, driven through A1111's hook order (tests/webui_flow.py over the contract in tests/contract).
Each sampling step runs the UNet on cond and uncond together, as A1111 does with ``batch_cond_uncond``.

Reports: the median per-step sampling time ratio (on / off), and AlignIT's one-time cost per generation
(rewriting, layout, encoding p', splicing) relative to one UNet step.

    .venv/bin/python bench/text_concept.py [--steps 10] [--latent 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "contract")]

from clip_parts import clip_tokenizer, clip_vit_l_text_model  # noqa: E402
from ldm_parts import sd15_unet  # noqa: E402
from modules import prompt_parser, sd_hijack, shared  # noqa: E402
from webui_flow import FakeModel, Processing, generate  # noqa: E402

from alignit.hosts import a1111  # noqa: E402

PROMPT = "a photo of <sks> playing badminton in a garden, detailed, sharp focus"


class TimedProcessing(Processing):
    """Times each UNet step; cond and uncond go through the UNet as one batch of 2."""

    latent = 32

    def sample(self, c, steps):
        unet = shared.sd_model.unet
        times = []
        uncond = self.uc[0][0].cond
        for step in range(steps):
            start = time.perf_counter()
            _, cond = prompt_parser.reconstruct_multicond_batch(c, step)
            context = torch.cat([cond, uncond[None]])
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(2, 4, self.latent, self.latent, generator=generator)
            with torch.no_grad():
                unet(x, torch.full((2,), 500), context=context)
            times.append(time.perf_counter() - start)
        self.sampled.append(times)


def timed_hooks() -> dict[str, float]:
    """Wrap AlignIT's three hooks to add up the time they take."""
    spent = {"alignit": 0.0}
    for name in ("process", "prepare_batch", "before_sampling"):
        original = getattr(a1111, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent["alignit"] += time.perf_counter() - start

        setattr(a1111, name, timed)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    TimedProcessing.latent = options.latent

    torch.manual_seed(0)
    shared.sd_model = FakeModel(clip_vit_l_text_model(), clip_tokenizer(), sd15_unet())
    clip = shared.sd_model.cond_stage_model
    database = sd_hijack.EmbeddingDatabase()
    sd_hijack.model_hijack.embedding_db = database
    database.register_embedding(sd_hijack.Embedding(torch.randn(4, 768) * 0.02, "sks"), clip.tokenize(["sks"])[0])
    args = [True, 0.0, 1.0, "*", "kv", "<sks>", "cat", "sks", 1.0]
    spent = timed_hooks()

    per_step: dict[str, list[float]] = {"off": [], "on": []}
    one_time = []
    for repeat in range(options.repeats):
        for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
            Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
            spent["alignit"] = 0.0
            p = generate(TimedProcessing([PROMPT], steps=options.steps, negative="blurry"), args if mode == "on" else None)
            per_step[mode].extend(p.sampled[0][1:])  # the first step of a run warms up
            if mode == "on":
                one_time.append(spent["alignit"])
    off, on = statistics.median(per_step["off"]), statistics.median(per_step["on"])
    cost = statistics.median(one_time)
    print(f"SD1.5 UNet and CLIP-L (random weights), latent {options.latent}x{options.latent}, cond+uncond, {options.steps} steps")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options.repeats} runs each, interleaved")
    print(f"median UNet step: off {off:.3f} s, on {on:.3f} s, ratio on/off {on / off:.4f}")
    print(f"AlignIT one-time cost per generation: {cost:.3f} s = {cost / off:.3f} UNet steps")


if __name__ == "__main__":
    main()
