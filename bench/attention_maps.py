"""What the attention maps cost per sampling step, on SD1.5's full-size UNet, per choice of recorded layers.

SD1.5's UNet (configs/v1-inference.yaml ``unet_config``, tests/ldm_parts.py ``sd15_unet``) with random weights (its
zero-initialised layers filled, so that it computes something), a 64×64 latent (512 px), cond and uncond in one batch
of 2 with 77-row contexts, as A1111 runs a step. For each choice of levels (downsampling factors of the recorded
cross-attention layers: 1 = 64×64, 2 = 32×32, 4 = 16×16, 8 = the 8×8 middle block) UNet calls alternate without and
with A1111's map hooks (``alignit.hosts.webui.a1111_maps``: the same ``MapRecorder`` Forge's patches feed), so the
machine's drift cancels out; reported: the median per-step ratio on/off in CPU time (this process's threads; on a
machine shared with other work, steadier than wall time, which is reported too), the CPU time spent recording (inside
``MapRecorder.match``/``add``) as a share of a step, and the memory the maps take: what the recorder holds, the
largest slice of scores (with its softmax and head sum), and the q and k the hooks keep for one layer, against the
UNet's parameters' bytes (float32 here; a half-precision UNet has half those bytes, and so have the kept q and k).

    flock /work/webuis/.heavy.lock .venv/bin/python bench/attention_maps.py [--pairs 4] [--levels 2,4 1,2,4,8 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "contract")]

from ldm_parts import sd15_unet  # noqa: E402

from alignit import attention_maps  # noqa: E402
from alignit.attention_maps import CondEntry, MapRecorder, columns  # noqa: E402
from alignit.hosts.webui import a1111_maps  # noqa: E402
from alignit.kv_hooks import attn2_factors  # noqa: E402

WORDS = 8  # the most words a map run draws
WORD_ROWS = [[4], [5, 6], [7], [8], [9], [10], [11], [12]]  # a concept of two vectors among them


def filled(unet: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return unet


class Timed(MapRecorder):
    """A recorder that adds up the CPU time spent in it."""

    spent = 0.0

    def match(self, *args, **kwargs):
        start = time.process_time()
        try:
            return super().match(*args, **kwargs)
        finally:
            Timed.spent += time.process_time() - start

    def add(self, *args, **kwargs):
        start = time.process_time()
        try:
            return super().add(*args, **kwargs)
        finally:
            Timed.spent += time.process_time() - start


def recorder(cond: torch.Tensor) -> Timed:
    words: list[int | None] = [None] * 77
    for word, rows in enumerate(WORD_ROWS):
        for row in rows:
            words[row] = word
    maps = Timed([WORDS])
    maps.set_entries([CondEntry(0, cond, columns(words, WORDS))])
    return maps


def step(unet: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, hooks: a1111_maps.MapHooks | None) -> tuple[float, float]:
    """One UNet step: (wall time, CPU time of this process's threads)."""
    if hooks is not None:
        hooks.denoiser_call(SimpleNamespace(text_cond=context[:1]))
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        unet(x, torch.full((x.shape[0],), 500), context=context)
    return time.perf_counter() - wall, time.process_time() - cpu


def kept_bytes(unet: torch.nn.Module, levels: tuple[int, ...], latent: int) -> int:
    """The most bytes of q and k the hooks keep at once (one layer's, for the batch of 2)."""
    largest = 0
    for name, factor in attn2_factors(unet).items():
        if factor in levels:
            side = -(-latent // factor)
            to_q = unet.get_submodule(f"{name}.to_q")
            assert isinstance(to_q, torch.nn.Linear)
            queries, inner = side * side, to_q.out_features
            largest = max(largest, 2 * (queries + 77) * inner * 4)
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--pairs", type=int, default=4, help="alternating UNet calls per choice of levels")
    parser.add_argument("--levels", nargs="+", default=["2,4", "1,2,4,8", "4", "2"], help="choices, e.g. 2,4")
    options = parser.parse_args()

    torch.manual_seed(0)
    unet = filled(sd15_unet())
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    generator = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(77, 768, generator=generator), torch.randn(77, 768, generator=generator)
    context = torch.stack([cond, uncond])
    x = torch.randn(2, 4, options.latent, options.latent, generator=generator)
    print(f"SD1.5 UNet, random weights, latent {options.latent}x{options.latent}, cond+uncond batch of 2, {WORDS} words")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet parameters {unet_bytes / 2**20:.0f} MiB (float32)")
    step(unet, x, context, None)  # warm up
    for choice in options.levels:
        levels = tuple(int(level) for level in choice.split(","))
        layers = sum(factor in levels for factor in attn2_factors(unet).values())
        walls, cpus, spent, off_times = [], [], [], []
        for pair in range(options.pairs):
            maps = recorder(cond)
            order = ("off", "on") if pair % 2 == 0 else ("on", "off")
            times = {}
            for mode in order:
                hooks = a1111_maps.MapHooks(unet, maps, [0], levels=levels) if mode == "on" else None
                Timed.spent = 0.0
                times[mode] = step(unet, x, context, hooks)
                if hooks is not None:
                    hooks.remove()
                    spent.append(Timed.spent)
            walls.append(times["on"][0] / times["off"][0])
            cpus.append(times["on"][1] / times["off"][1])
            off_times.append(times["off"][1])
        off = statistics.median(off_times)
        transient = maps.largest_slice * 4 * 2 + maps.largest_slice // 8 * 4  # scores, softmax, their sum over heads
        kept = kept_bytes(unet, levels, options.latent)
        total = maps.held_bytes() + transient + kept
        print(
            f"levels {choice} ({layers} layers): per-step ratio on/off {statistics.median(cpus):.4f} in CPU time, "
            f"{statistics.median(walls):.4f} in wall time (medians of {options.pairs} pairs; off {off:.2f} CPU s), "
            f"recording {statistics.median(spent) / off:.2%} of a step's CPU time; "
            f"memory {total / 2**20:.2f} MiB = {total / unet_bytes:.3%} of the UNet's "
            f"(held {maps.held_bytes() / 2**10:.0f} KiB, slice {transient / 2**20:.2f} MiB, q and k kept {kept / 2**20:.2f} MiB)"
        )
    print(f"slice bound: {attention_maps.SLICE_ELEMENTS} scores")


if __name__ == "__main__":
    main()
