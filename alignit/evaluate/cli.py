"""``alignit evaluate``: every job (concept × prompt × seed) generated twice with the same seed, AlignIT off and on,
scored with CustomConcept101's metrics; data-parallel under ``accelerate launch -m alignit evaluate …``.

Output folder: ``images/`` and ``jobs/`` (one record per job, written as it finishes), ``results.jsonl`` (one line a
job), ``timings.jsonl``, ``summary.csv``, ``plot.png``, ``report.html``. A rerun with the same ``--out`` skips the
jobs that are done (failed ones run again).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..cli import parse_size
from ..errors import InputError
from .generator import DEFAULT_GENERATOR, GenerationSettings, load_factory
from .inputs import load_concepts
from .runner import RunConfig, evaluate
from .summary import OVERALL, SHORT

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concepts", required=True, type=Path, help="our YAML, or CustomConcept101's dataset.json")
    parser.add_argument("--sources", type=Path, help="with dataset.json: a folder of NAME.safetensors (.bin, .pt)")
    parser.add_argument("--out", required=True, type=Path, help="output folder; a rerun with the same folder resumes")
    parser.add_argument("--seeds", default="4", help="a count (seeds 0..N-1) or a comma-separated list (default 4)")
    parser.add_argument("--prompts-limit", type=int, help="at most this many prompts per concept (the first ones)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model: a path or hub id for the generator")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (CustomConcept101 used 6)")
    parser.add_argument("--size", default="512", type=parse_size, help="WIDTHxHEIGHT or one number for both")
    parser.add_argument("--device", help="default: this process's device under accelerate (cuda:N, mps or cpu)")
    dtypes = ("auto", "float16", "bfloat16", "float32")
    parser.add_argument("--dtype", default="auto", choices=dtypes, help="auto: float16 on cuda, else float32")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP, help="transformers CLIPModel id or path (text and image alignment)")
    parser.add_argument("--dino-model", default=DEFAULT_DINO, help="transformers ViTModel id or path (DINO image alignment)")
    parser.add_argument(
        "--generator",
        default=DEFAULT_GENERATOR,
        help="MODULE:FACTORY building an image generator per concept, to evaluate another generator "
        "(factory(concept, settings).generate(prompt, seed, aligned) -> PIL image)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for the 95%% intervals")


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        if "," in text:
            seeds = tuple(int(part) for part in text.split(",") if part.strip())
        else:
            seeds = tuple(range(int(text)))
    except ValueError as error:
        raise InputError(f"--seeds {text!r}: a count or a comma-separated list of integers") from error
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InputError(f"--seeds {text!r}: give at least one seed, no repeats, none negative")
    return seeds


def _settings(args: argparse.Namespace) -> GenerationSettings:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if args.steps < 1 or not math.isfinite(args.guidance):
        raise InputError("--steps must be at least 1 and --guidance a number")
    # PartialState reads neither `accelerate launch --cpu` nor --device: without cpu=True, processes started on a
    # machine without GPUs would each run alone instead of sharing the jobs over gloo.
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = args.device or str(state.device)
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    width, height = args.size
    return GenerationSettings(args.model, args.steps, args.guidance, width, height, device, dtype, args.negative_prompt)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 done (failed jobs are in the results), 2 bad input (one line on stderr), 130 interrupted."""
    try:
        if args.prompts_limit is not None and args.prompts_limit < 1:
            raise InputError("--prompts-limit must be at least 1")
        if args.bootstrap < 1:
            raise InputError("--bootstrap must be at least 1")
        config = RunConfig(
            out=args.out,
            concepts=load_concepts(args.concepts, args.sources),
            seeds=parse_seeds(args.seeds),
            settings=_settings(args),
            clip_model=args.clip_model,
            dino_model=args.dino_model,
            generator=args.generator,
            prompts_limit=args.prompts_limit,
            bootstrap=args.bootstrap,
        )
        factory = load_factory(args.generator)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"--out {args.out}: {error.strerror}") from error
        rows = evaluate(config, factory)
    except InputError as error:
        print(f"alignit evaluate: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alignit evaluate: interrupted; run it again with --out {args.out} to go on", file=sys.stderr)
        return 130
    if rows:
        overall = rows[-1]
        assert overall.name == OVERALL
        print(f"{overall.done} of {overall.jobs} jobs done, {overall.failed} failed; {args.out / 'report.html'}")
        for metric, short in SHORT.items():
            print(
                f"  {short}: off {overall.off[metric]:.4f}  on {overall.on[metric]:.4f}  "
                f"on - off {overall.diff[metric]:+.4f} [{overall.low[metric]:+.4f}, {overall.high[metric]:+.4f}]"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignit evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
