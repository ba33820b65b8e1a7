"""Sampling time with AlignIT on vs off in a diffusers ``StableDiffusionPipeline``, in one run, for one kind of concept.

The pipeline holds SD1.5's full-size UNet (``UNet2DConditionModel`` with SD1.5's config) and CLIP ViT-L/14's text
encoder, both with random weights, a tiny VAE (the benchmark times UNet steps) and the real CLIP vocabulary.
``--concept ti`` (an embedding of 4 vectors: text side only), ``lora`` (rank 16 on every attn2 to_k/to_v and the text
encoder's attention, "kv" scope) or ``cd`` (Custom Diffusion: full to_k/to_v weights and a modifier token).

Reports: the median per-step time ratio (on / off) of whole generations interleaved on, off, off, on (off: the base
pipeline on the class-word prompt, the same UNet work), the same ratio from UNet calls that alternate with and without
AlignIT's K/V hooks (paired, so the machine's drift cancels out), the time spent inside the hooks per step, and
AlignIT's one-time cost per generation (reading the prompt, encoding p', splicing, installing hooks) in UNet steps.

    .venv/bin/python bench/diffusers_overhead.py --concept lora [--steps 10] [--latent 32] [--repeats 2] [--pairs 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from clip_parts import clip_vit_l_text_model  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers_parts import lora_state, scheduler, text_lora_factors, tokenizer, vae  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from weight_files import cd_state, random_cd_weights, random_factors  # noqa: E402

from alignit import kv_hooks  # noqa: E402
from alignit.concepts import Concept  # noqa: E402
from alignit.hosts.diffusers import AlignIT, flow  # noqa: E402

PROMPT = "a photo of {trigger} playing badminton in a garden, detailed, sharp focus"


def sd15_pipeline() -> Any:
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5's config
    pipe: Any = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip_vit_l_text_model(),
        tokenizer=tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def concept(kind: str, pipe: Any, folder: Path) -> tuple[Concept, str]:
    """The concept of one kind, its file written into ``folder``, and the class-word prompt's trigger."""
    if kind == "ti":
        torch.save({"<sks>": torch.randn(4, 768) * 0.02}, folder / "sks.bin")
        return Concept("<sks>", "cat", str(folder / "sks.bin")), "<sks>"
    if kind == "lora":
        state = lora_state(random_factors(pipe.unet, rank=16), [text_lora_factors(pipe.text_encoder, rank=16)], "kohya")
        save_file(state, str(folder / "lora.safetensors"))
        return Concept("ohwx", "cat", f"lora:{folder / 'lora.safetensors'}"), "ohwx"
    torch.save(cd_state(random_cd_weights(pipe.unet, scale=0.01), torch.randn(1, 768) * 0.02, "delta_bin"), folder / "delta.bin")
    return Concept("<new1> cat", "cat", f"cd:{folder / 'delta.bin'}"), "<new1> cat"


class Timeline:
    """Timestamps of one generation: its start, the first UNet call, the end of each step."""

    def __init__(self, pipe: Any):
        self.start = 0.0
        self.first_unet: float | None = None
        self.steps: list[float] = []
        self.context: torch.Tensor | None = None
        pipe.unet.register_forward_pre_hook(self._unet, with_kwargs=True)

    def begin(self) -> None:
        self.start, self.first_unet, self.steps = time.perf_counter(), None, []

    def _unet(self, module, args, kwargs) -> None:
        if self.first_unet is None:
            self.first_unet = time.perf_counter()
            self.context = kwargs["encoder_hidden_states"]

    def step_end(self, pipe, step, timestep, tensors) -> dict:
        self.steps.append(time.perf_counter())
        return {}

    def step_times(self) -> list[float]:
        assert self.first_unet is not None
        ends = [self.first_unet, *self.steps]
        return [b - a for a, b in zip(ends[1:-1], ends[2:])]  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=("ti", "lora", "cd"), default="lora")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px with SD's VAE)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=12, help="alternating UNet calls for the paired ratio")
    options = parser.parse_args()

    pipe = sd15_pipeline()
    folder = Path(tempfile.mkdtemp(prefix="alignit-bench-"))
    the_concept, trigger = concept(options.concept, pipe, folder)
    aligned = AlignIT(pipe, [the_concept])
    timeline = Timeline(pipe)
    size = options.latent * pipe.vae_scale_factor
    call = {"num_inference_steps": options.steps, "height": size, "width": size, "negative_prompt": "blurry"}
    call |= {"callback_on_step_end": timeline.step_end, "output_type": "latent"}

    injected: dict = {}
    hook_time = {"total": 0.0}

    class Injector(kv_hooks.KVInjector):  # keeps what AlignIT installs, times its hooks
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            injected["args"] = (args, kwargs)

        def _hook(self, key):
            hook = super()._hook(key)

            def timed(*hook_args):
                start = time.perf_counter()
                try:
                    return hook(*hook_args)
                finally:
                    hook_time["total"] += time.perf_counter() - start

            return timed

    flow.KVInjector = Injector  # type: ignore[misc]
    per_step: dict[str, list[float]] = {"on": [], "off": []}
    before_first: dict[str, list[float]] = {"on": [], "off": []}
    in_hooks = []
    for repeat in range(options.repeats):
        for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
            generator = torch.Generator().manual_seed(repeat)
            hook_time["total"] = 0.0
            timeline.begin()
            with torch.no_grad():
                if mode == "on":
                    aligned(PROMPT.format(trigger=trigger), generator=generator, **call)
                    in_hooks.append(hook_time["total"] / options.steps)
                else:
                    pipe(PROMPT.format(trigger="cat"), generator=generator, **call)
            assert timeline.first_unet is not None
            per_step[mode] += timeline.step_times()
            before_first[mode].append(timeline.first_unet - timeline.start)
    assert not aligned.messages, aligned.messages
    off, on = statistics.median(per_step["off"]), statistics.median(per_step["on"])
    extra = statistics.median(before_first["on"]) - statistics.median(before_first["off"])
    print(f"concept: {options.concept}; SD1.5 UNet + CLIP ViT-L/14 (random weights), latent {options.latent}x{options.latent}")
    print(f"diffusers StableDiffusionPipeline, cond+uncond batch, {options.steps} steps")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options.repeats} runs each, interleaved")
    print(f"median step: off {off:.3f} s, on {on:.3f} s, ratio on/off {on / off:.4f}")
    if "args" in injected:
        args, kwargs = injected["args"]
        x = torch.randn(2, 4, options.latent, options.latent, generator=torch.Generator().manual_seed(0))
        t = torch.full((2,), 500)
        ratios = []
        with torch.no_grad():
            for _ in range(options.pairs):
                start = time.perf_counter()
                pipe.unet(x, t, encoder_hidden_states=timeline.context)
                plain = time.perf_counter() - start
                with kv_hooks.KVInjector(*args, **kwargs):
                    start = time.perf_counter()
                    pipe.unet(x, t, encoder_hidden_states=timeline.context)
                    hooked = time.perf_counter() - start
                ratios.append(hooked / plain)
        paired = statistics.median(ratios)
        print(f"paired UNet calls with / without the K/V hooks: ratio {paired:.4f} (median of {options.pairs})")
        hooks = statistics.median(in_hooks)
        print(f"time inside the K/V hooks per step: {hooks * 1000:.2f} ms = {hooks / off:.2%} of a step")
    else:
        print("no K/V hooks (text side only)")
    print(f"AlignIT's one-time cost per generation (before the first step): {extra:.3f} s = {extra / off:.3f} steps")


if __name__ == "__main__":
    main()
