"""Sampling time with AlignIT on vs off, in one run, on full-size SD1.5 parts, for one kind of concept.

``--concept ti`` (an embedding: text side only), ``lora`` (rank 16 on every attn2 to_k/to_v and the text encoder's
q/v, "kv" scope) or ``cd`` (Custom Diffusion: full to_k/to_v weights). ``--model sd15``: SD1.5's UNet
(configs/v1-inference.yaml ``unet_config``) and CLIP ViT-L/14's text encoder; ``--model sdxl``: an SDXL-shaped UNet
(tests/ldm_parts.py ``sdxl_shaped_unet``: SDXL's widths, fewer transformer blocks) and CLIP-L with OpenCLIP-bigG's
text tower. All weights are random; A1111's hook order is driven through tests/webui_flow.py over the contract in
tests/contract. Each sampling step runs the UNet on cond and uncond together, as A1111 does.

Reports: the median per-step time ratio (on / off) of whole generations, the same ratio from UNet calls that
alternate with and without AlignIT's K/V hooks (paired, so the machine's drift cancels out), the time spent inside
the K/V hooks per step, AlignIT's one-time cost per generation
(rewriting, layout, encoding p', splicing, installing hooks) relative to one UNet step, and the memory its hooks hold.

    .venv/bin/python bench/overhead.py --concept lora [--model sd15|sdxl] [--steps 20] [--latent 32] [--repeats 2]
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
from clip_parts import clip_tokenizer, clip_vit_l_text_model, open_clip_vit_bigg_text_model  # noqa: E402
from ldm_parts import sd15_unet, sdxl_shaped_unet  # noqa: E402
from modules import prompt_parser, sd_hijack, shared  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sync_counter import SyncCounter  # noqa: E402
from webui_flow import FakeModel, FakeSDXLModel, Processing, generate  # noqa: E402
from weight_files import cd_state, lora_state, random_cd_weights, random_factors, random_text_factors  # noqa: E402

from alignit import kv_hooks as kv  # noqa: E402
from alignit.hosts.webui import flow  # noqa: E402

PROMPT = "a photo of {trigger} playing badminton in a garden, detailed, sharp focus"


class TimedProcessing(Processing):
    """Times each UNet step; cond and uncond go through the UNet as one batch of 2."""

    latent = 32

    def sample(self, c, steps):
        unet = shared.sd_model.unet
        self.last = c
        times = []
        uncond = rows(self.uc[0][0].cond)
        for step in range(steps):
            start = time.perf_counter()
            _, cond = prompt_parser.reconstruct_multicond_batch(c, step)
            context = torch.cat([rows(cond), uncond[None]])
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(2, 4, self.latent, self.latent, generator=generator)
            with torch.no_grad():
                unet(x, torch.full((2,), 500), context=context)
            times.append(time.perf_counter() - start)
        self.sampled.append(times)


def rows(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def concept(kind: str, unet: torch.nn.Module, text_model: torch.nn.Module, folder: Path, sdxl: bool) -> tuple[str, list]:
    """The trigger and the concept row for one kind of concept, its files written into ``folder``."""
    if kind == "ti":
        ids = clip_tokenizer()(["sks"], add_special_tokens=False)["input_ids"][0]
        vec = (
            {"clip_l": torch.randn(4, 768) * 0.02, "clip_g": torch.randn(4, 1280) * 0.02} if sdxl else torch.randn(4, 768) * 0.02
        )
        sd_hijack.model_hijack.embedding_db.register_embedding(sd_hijack.Embedding(vec, "sks"), ids)
        return "<sks>", ["<sks>", "cat", "sks", 1.0]
    if kind == "lora":
        state = lora_state(random_factors(unet, rank=16), random_text_factors(text_model, rank=16), "kohya")
        save_file(state, str(folder / "concept.safetensors"))
        networks.available_network_aliases = {"concept": SimpleNamespace(filename=str(folder / "concept.safetensors"))}
        return "ohwx", ["ohwx", "cat", "lora:concept", 1.0]
    torch.save(cd_state(random_cd_weights(unet, scale=0.01), torch.randn(1, 768) * 0.02, "delta_bin"), folder / "concept.bin")
    shared.opts.alignit_custom_diffusion_dir = str(folder)
    return "<new1> cat", ["<new1> cat", "cat", "cd:concept", 1.0]


def injector(unet: torch.nn.Module, p: TimedProcessing) -> kv.KVInjector | None:
    """K/V hooks for ``p``'s generation, as AlignIT installs them for a pass (None for a text-side concept)."""
    splicer = getattr(p, flow.STATE_ATTRIBUTE).splicer
    chunks, global_kv = splicer.kv_chunks(), splicer.global_kv()
    return kv.KVInjector(unet, chunks, splicer.kv_weights(), global_kv) if chunks or global_kv else None


def unet_call(unet: torch.nn.Module, p: TimedProcessing) -> None:
    """One UNet step on the first step's cond and uncond, as the generation ran it."""
    _, cond = prompt_parser.reconstruct_multicond_batch(p.last, 0)
    context = torch.cat([rows(cond), rows(p.uc[0][0].cond)[None]])
    x = torch.randn(2, 4, TimedProcessing.latent, TimedProcessing.latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unet(x, torch.full((2,), 500), context=context)


def paired_ratio(unet: torch.nn.Module, p: TimedProcessing, pairs: int) -> float | None:
    """Median time ratio of UNet calls with / without the K/V hooks of ``p``'s generation, alternating call by call."""
    ratios = []
    for _ in range(pairs):
        start = time.perf_counter()
        unet_call(unet, p)
        off = time.perf_counter() - start
        hooks = injector(unet, p)
        if hooks is None:
            return None
        with hooks:
            start = time.perf_counter()
            unet_call(unet, p)
            on = time.perf_counter() - start
        ratios.append(on / off)
    return statistics.median(ratios)


def syncs_per_step(unet: torch.nn.Module, p: TimedProcessing) -> int | None:
    """Host-device synchronisations inside the K/V hooks during one UNet step (the second: the first prepares)."""
    hooks = injector(unet, p)
    if hooks is None:
        return None
    counter = SyncCounter()
    with hooks:
        unet_call(unet, p)
        with counter:
            unet_call(unet, p)
    return counter.count


def hook_bytes(p: TimedProcessing) -> int:
    """Memory the K/V hooks hold for a pass: the table of marked chunks and, per layer, the concept rows' deltas."""
    unet = shared.sd_model.unet
    hooks = injector(unet, p)
    if hooks is None:
        return 0
    with hooks:
        unet_call(unet, p)
        rewriter = hooks.rewriter
        tensors = [rewriter.table] + [t for prepared in rewriter._prepared.values() for t in vars(prepared).values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed_hooks() -> dict[str, float]:
    """Wrap AlignIT's script hooks and its K/V hooks to add up the time they take."""
    spent = {"alignit": 0.0, "kv": 0.0}
    make_hook = kv.KVInjector._hook

    def timed_hook(self, key):
        hook = make_hook(self, key)

        def timed(*args):
            start = time.perf_counter()
            try:
                return hook(*args)
            finally:
                spent["kv"] += time.perf_counter() - start

        return timed

    setattr(kv.KVInjector, "_hook", timed_hook)  # noqa: B010 - mypy refuses assigning to a method
    for name in ("process", "prepare_batch", "before_sampling"):
        original = getattr(flow, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent["alignit"] += time.perf_counter() - start

        setattr(flow, name, timed)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=("ti", "lora", "cd"), default="ti")
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=12, help="alternating UNet calls for the paired ratio")
    options = parser.parse_args()
    TimedProcessing.latent = options.latent

    sdxl = options.model == "sdxl"
    if sdxl and options.concept == "cd":
        parser.error("Custom Diffusion modifier tokens are refused on SDXL")
    torch.manual_seed(0)
    text_model = clip_vit_l_text_model()
    if sdxl:
        unet = sdxl_shaped_unet()
        shared.sd_model = FakeSDXLModel(text_model, open_clip_vit_bigg_text_model(), clip_tokenizer(), unet)
    else:
        unet = sd15_unet()
        shared.sd_model = FakeModel(text_model, clip_tokenizer(), unet)
    sd_hijack.model_hijack.embedding_db = sd_hijack.EmbeddingDatabase()
    folder = Path(tempfile.mkdtemp(prefix="alignit-bench-"))
    trigger, row = concept(options.concept, unet, text_model, folder, sdxl)
    prompt = PROMPT.format(trigger=trigger)
    args = [True, 0.0, 1.0, "*", "kv", *row]
    spent = timed_hooks()

    per_step: dict[str, list[float]] = {"off": [], "on": []}
    one_time, kv_time = [], []
    for repeat in range(options.repeats):
        for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
            Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
            spent["alignit"] = spent["kv"] = 0.0
            p = generate(TimedProcessing([prompt], steps=options.steps, negative="blurry"), args if mode == "on" else None)
            assert not p.comments, p.comments
            per_step[mode].extend(p.sampled[0][1:])  # the first step of a run warms up
            if mode == "on":
                one_time.append(spent["alignit"])
                kv_time.append(spent["kv"] / options.steps)
                last_on = p
    off, on = statistics.median(per_step["off"]), statistics.median(per_step["on"])
    cost = statistics.median(one_time)
    print(f"concept: {options.concept}; model: {options.model} (random weights), latent {options.latent}x{options.latent}")
    print(f"cond+uncond batch, {options.steps} steps")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options.repeats} runs each, interleaved")
    print(f"median UNet step: off {off:.3f} s, on {on:.3f} s, ratio on/off {on / off:.4f}")
    paired = paired_ratio(unet, last_on, options.pairs)
    if paired is not None:
        print(f"paired UNet calls with / without the K/V hooks: ratio {paired:.4f} (median of {options.pairs})")
    hooks = statistics.median(kv_time)
    print(f"time inside the K/V hooks per step: {hooks * 1000:.2f} ms = {hooks / off:.2%} of a step")
    print(f"host-device synchronisations inside the K/V hooks per step: {syncs_per_step(unet, last_on)}")
    print(f"AlignIT one-time cost per generation: {cost:.3f} s = {cost / off:.3f} UNet steps")
    print(f"memory held by the K/V hooks: {hook_bytes(last_on) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
