"""The evaluation's own cost per job beside generation, as a ratio of the generation time.

Evaluation (measured through ``alignit.evaluate.runner.evaluate`` itself, with a generator that hands over ready
images): feature extraction with full-size CLIP ViT-B/32 (transformers' ``CLIPConfig()`` defaults) and DINO ViT-S/16
built from their configs with random weights and loaded by path, writing both images and the job's record, and the
job bookkeeping around them. Generation: the UNet (cond and uncond as one batch of 2) for ``--steps`` steps plus
the VAE decode, per image, two images a job; the UNet time is extrapolated from ``--timed-steps`` timed steps (after
one warm-up step). "tiny": the small UNet/VAE of diffusers' own pipeline tests (64 px images); "sd15": SD1.5's UNet
and VAE from their configs (512 px). All weights random; float32, one CPU thread.

Times are CPU times of the measuring thread (``time.thread_time``), so that other processes on a shared machine do
not skew the ratio; writing adds its wall-clock wait for the disk (PNG encoding, fsync) on top.

    flock /work/webuis/.heavy.lock .venv/bin/python bench/evaluate_overhead.py [--unet tiny sd15] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from clip_parts import clip_tokenizer  # noqa: E402
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel  # noqa: E402

from alignit.evaluate import runner  # noqa: E402
from alignit.evaluate.generator import GenerationSettings  # noqa: E402
from alignit.evaluate.inputs import EvalConcept  # noqa: E402


def tiny_parts() -> tuple[UNet2DConditionModel, AutoencoderKL, int]:
    """diffusers' tests' tiny Stable Diffusion UNet and VAE (tests/pipelines/stable_diffusion)."""
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    return unet, vae, 32


def sd15_parts() -> tuple[UNet2DConditionModel, AutoencoderKL, int]:
    """SD1.5's UNet (unet/config.json) and VAE (vae/config.json): 64x64 latents, 512 px images."""
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    return unet, vae, 64


@torch.no_grad()
def generation_seconds(
    unet: UNet2DConditionModel, vae: AutoencoderKL, latent: int, steps: int, timed: int
) -> tuple[float, Image.Image]:
    """One image: ``steps`` UNet steps (batch 2, extrapolated from ``timed``) plus the VAE decode; and the image."""
    unet.eval()
    vae.eval()
    width = unet.config["cross_attention_dim"]
    x = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(1))
    unet(x, 500, encoder_hidden_states=context)
    times = []
    for step in range(timed):
        start = time.thread_time()
        x = x + 0.01 * unet(x, 900 - step, encoder_hidden_states=context).sample
        times.append(time.thread_time() - start)
    start = time.thread_time()
    decoded = vae.decode(x[:1] / 0.18215).sample
    decode = time.thread_time() - start
    pixels = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return steps * statistics.median(times) + decode, Image.fromarray(pixels)


class ReadyImages:
    """A generator that hands over ready images (the evaluation's cost alone is timed)."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images, self.calls = images, 0

    def generate(self, prompt: str, seed: int, aligned: bool) -> Image.Image:
        self.calls += 1
        return self.images[self.calls % len(self.images)]


def save_metric_models(folder: Path) -> tuple[Path, Path]:
    """CLIP ViT-B/32 and DINO ViT-S/16 at full size from their configs, random weights, saved like hub checkpoints."""
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder / "clip")
    clip_tokenizer().save_pretrained(folder / "clip")
    dino = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16)
    ViTModel(dino, add_pooling_layer=False).save_pretrained(folder / "dino")
    return folder / "clip", folder / "dino"


def evaluation_seconds(folder: Path, clip: Path, dino: Path, images: list[Image.Image], jobs: int) -> dict[str, float]:
    """Median per job, through the runner: the whole job (CPU), its feature extraction (CPU) and its writing (wall)."""
    references = folder / "references"
    references.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(references / f"{index}.png")
    concept = EvalConcept("bench", "none", "<sks>", "cat", references, tuple(f"a {{}} number {i}" for i in range(jobs)))
    width, height = images[0].size
    settings = GenerationSettings("none", 1, 1.0, width, height, "cpu", "float32")
    config = runner.RunConfig(folder / "out", [concept], [0], settings, str(clip), str(dino), "bench")
    spent: dict[str, list[float]] = {"job": [], "score": [], "write": [], "write_cpu": []}

    def timed(function, *keys):
        def wrapper(*args, **kwargs):
            cpu, wall = time.thread_time(), time.perf_counter()
            result = function(*args, **kwargs)
            spent[keys[0]].append(time.thread_time() - cpu)
            if len(keys) > 1:
                spent[keys[1]].append(time.perf_counter() - wall)
            return result

        return wrapper

    originals = runner._Worker.run, runner.score, runner.save_image
    runner._Worker.run = timed(originals[0], "job")  # type: ignore[method-assign]
    runner.score = timed(originals[1], "score")
    runner.save_image = timed(originals[2], "write_cpu", "write")
    try:
        runner.evaluate(config, lambda concept, settings: ReadyImages(images))
    finally:
        runner._Worker.run, runner.score, runner.save_image = originals  # type: ignore[method-assign]
    # The first job also loads the models and the references' features; each job saves two images.
    pairs = lambda values: [a + b for a, b in zip(values[2::2], values[3::2])]  # noqa: E731
    write, write_cpu = pairs(spent["write"]), pairs(spent["write_cpu"])
    return {
        "job": statistics.median(j + w - c for j, w, c in zip(spent["job"][1:], write, write_cpu)),
        "score": statistics.median(spent["score"][1:]),
        "write": statistics.median(write),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, float32 CPU")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        clip, dino = save_metric_models(folder)
        for name in args.unet:
            unet, vae, latent = (tiny_parts if name == "tiny" else sd15_parts)()
            per_image, image = generation_seconds(unet, vae, latent, args.steps, args.timed_steps)
            del unet, vae
            images = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image.rotate(90)]
            spent = evaluation_seconds(folder / name, clip, dino, images, args.jobs)
            generation = 2 * per_image
            print(
                f"{name}: {image.size[0]} px; generation {generation:.3f} s a job (2 images, {args.steps} steps, "
                f"UNet extrapolated from {args.timed_steps}); evaluation {spent['job'] * 1000:.1f} ms a job "
                f"(features {spent['score'] * 1000:.1f} ms CPU, writing {spent['write'] * 1000:.1f} ms wall); "
                f"ratio {spent['job'] / generation:.4f}"
            )


if __name__ == "__main__":
    main()
