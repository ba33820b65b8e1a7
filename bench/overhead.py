"""Sampling time with AlignIT on vs off, in one run, on full-size SD1.5 parts, for one kind of concept.

``--concept ti`` (an embedding: text side only), ``lora`` (rank 16 on every attn2 to_k/to_v and the text encoder's
q/v, "kv" scope) or ``cd`` (Custom Diffusion: full to_k/to_v weights). The UNet is SD1.5's
(configs/v1-inference.yaml ``unet_config``) and the text encoder CLIP ViT-L/14's, both with random weights, driven
through A1111's hook order (tests/webui_flow.py over the contract in tests/contract). Each sampling step runs the
UNet on cond and uncond together, as A1111 does with ``batch_cond_uncond``.

Reports: the median per-step time ratio (on / off), AlignIT's one-time cost per generation (rewriting, layout,
encoding p', splicing, installing hooks) relative to one UNet step, and the memory AlignIT's hooks hold.

    .venv/bin/python bench/overhead.py --concept lora [--steps 20] [--latent 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "contract")]

import networks  # noqa: E402
from clip_parts import clip_tokenizer, clip_vit_l_text_model  # noqa: E402
from ldm_parts import sd15_unet  # noqa: E402
from modules import prompt_parser, sd_hijack, shared  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from webui_flow import FakeModel, Processing, generate  # noqa: E402
from weight_files import cd_state, lora_state, random_cd_weights, random_factors, random_text_factors  # noqa: E402

from alignit.hosts import a1111  # noqa: E402

PROMPT = "a photo of {trigger} playing badminton in a garden, detailed, sharp focus"


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


def concept(kind: str, unet: torch.nn.Module, text_model: torch.nn.Module, folder: Path) -> tuple[str, list]:
    """The trigger and the concept row for one kind of concept, its files written into ``folder``."""
    if kind == "ti":
        clip = shared.sd_model.cond_stage_model
        database = sd_hijack.model_hijack.embedding_db
        database.register_embedding(sd_hijack.Embedding(torch.randn(4, 768) * 0.02, "sks"), clip.tokenize(["sks"])[0])
        return "<sks>", ["<sks>", "cat", "sks", 1.0]
    if kind == "lora":
        state = lora_state(random_factors(unet, rank=16), random_text_factors(text_model, rank=16), "kohya")
        save_file(state, str(folder / "concept.safetensors"))
        networks.available_network_aliases = {"concept": SimpleNamespace(filename=str(folder / "concept.safetensors"))}
        return "ohwx", ["ohwx", "cat", "lora:concept", 1.0]
    torch.save(cd_state(random_cd_weights(unet, scale=0.01), torch.randn(1, 768) * 0.02, "delta_bin"), folder / "concept.bin")
    shared.opts.alignit_custom_diffusion_dir = str(folder)
    return "<new1> cat", ["<new1> cat", "cat", "cd:concept", 1.0]


def hook_bytes() -> int:
    """Memory held by the K/V hooks of the last generation: the row table and the per-layer concept rows."""
    injector = getattr(hook_bytes, "last", None)
    if injector is None:
        return 0
    tensors = [injector.table] + [t for layer in injector._layers.values() for _, t in layer.set_rows + layer.add_rows]
    return sum(t.numel() * t.element_size() for t in tensors)


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
    original_finish = a1111.finish_batch

    def finish(p):
        hook_bytes.last = getattr(p, a1111.STATE_ATTRIBUTE).injector
        original_finish(p)

    a1111.finish_batch = finish
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=("ti", "lora", "cd"), default="ti")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    TimedProcessing.latent = options.latent

    torch.manual_seed(0)
    text_model, unet = clip_vit_l_text_model(), sd15_unet()
    shared.sd_model = FakeModel(text_model, clip_tokenizer(), unet)
    sd_hijack.model_hijack.embedding_db = sd_hijack.EmbeddingDatabase()
    folder = Path(tempfile.mkdtemp(prefix="alignit-bench-"))
    trigger, row = concept(options.concept, unet, text_model, folder)
    prompt = PROMPT.format(trigger=trigger)
    args = [True, 0.0, 1.0, "*", "kv", *row]
    spent = timed_hooks()

    per_step: dict[str, list[float]] = {"off": [], "on": []}
    one_time = []
    for repeat in range(options.repeats):
        for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
            Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
            spent["alignit"] = 0.0
            p = generate(TimedProcessing([prompt], steps=options.steps, negative="blurry"), args if mode == "on" else None)
            assert not p.comments, p.comments
            per_step[mode].extend(p.sampled[0][1:])  # the first step of a run warms up
            if mode == "on":
                one_time.append(spent["alignit"])
    off, on = statistics.median(per_step["off"]), statistics.median(per_step["on"])
    cost = statistics.median(one_time)
    print(f"concept: {options.concept}; SD1.5 UNet and CLIP-L (random weights), latent {options.latent}x{options.latent}")
    print(f"cond+uncond batch, {options.steps} steps")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options.repeats} runs each, interleaved")
    print(f"median UNet step: off {off:.3f} s, on {on:.3f} s, ratio on/off {on / off:.4f}")
    print(f"AlignIT one-time cost per generation: {cost:.3f} s = {cost / off:.3f} UNet steps")
    print(f"memory held by the K/V hooks: {hook_bytes() / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
