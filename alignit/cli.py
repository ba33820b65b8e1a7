"""AlignIT's command line: ``alignit generate`` and ``alignit evaluate`` (also ``python -m alignit …``, and
``accelerate launch -m alignit evaluate …`` on several processes).

Bad input (a missing or unreadable file, a model that cannot be loaded, a trigger the prompt lacks, bad syntax) ends
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .concepts import Concept, parse_source
from .errors import ConceptError, InputError, LayoutMismatch, Unsupported

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
EXAMPLE_CONCEPT = "<cat-toy>=toy:sd-concepts-library/cat-toy"
EXAMPLE_PROMPT = "a <cat-toy> playing badminton in a garden"
USER_ERRORS = (InputError, ConceptError, Unsupported, LayoutMismatch)
_NUMBERED = re.compile(r"^(\d{5})-")


def parse_concept(text: str) -> Concept:
    """``TRIGGER=CLASS[:SOURCE[:STRENGTH]]``; a number after the source is the strength (a LoRA's own weight goes
    before it: ``lora:PATH:WEIGHT:STRENGTH``)."""
    trigger, equals, rest = text.partition("=")
    class_word, _, source = rest.partition(":")
    if not equals or not trigger.strip() or not class_word.strip():
        raise InputError(f"--concept {text!r}: write it as TRIGGER=CLASS[:SOURCE[:STRENGTH]]")
    strength = 1.0
    head, colon, last = source.rpartition(":")
    if colon and head:
        try:
            strength = float(last)
            source = head
        except ValueError:
            pass
    return Concept(trigger.strip(), class_word.strip(), source.strip(), strength)


def parse_size(text: str) -> tuple[int, int]:
    """``512`` or ``WIDTHxHEIGHT``, multiples of 8."""
    try:
        width, _, height = text.lower().partition("x")
        size = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write it as 512 or 768x512") from None
    if min(size) <= 0 or any(side % 8 for side in size):
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 8")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignit", description="AlignIT: customized concepts that keep the rest of the prompt")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser(
        "generate",
        help="generate images with AlignIT on a diffusers Stable Diffusion pipeline",
        description=(
            "Generate with AlignIT on a diffusers SD 1.x/2.x or SDXL pipeline. Without --concept it runs the standard "
            f"example: {EXAMPLE_CONCEPT!r} on {EXAMPLE_PROMPT!r}, with --compare. A local file or folder works "
            "wherever a hub id does."
        ),
    )
    generate.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local diffusers folder (default {DEFAULT_MODEL})")
    generate.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="TRIGGER=CLASS[:SOURCE[:STRENGTH]]",
        help="repeatable; SOURCE (default: the trigger): an embedding, LoRA or Custom Diffusion file, folder or hub id "
        "(lora:/cd: force the kind; lora:PATH:WEIGHT:STRENGTH), STRENGTH in [0, 2]",
    )
    generate.add_argument(
        "--prompt", help=f"the prompt, with each concept's trigger (default with no concept: {EXAMPLE_PROMPT!r})"
    )
    generate.add_argument("--negative-prompt", default="", help="the negative prompt (AlignIT never touches it)")
    generate.add_argument("--seed", type=int, help="default: a random seed, written to the PNG")
    generate.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    generate.add_argument("--size", type=parse_size, help="512 or WIDTHxHEIGHT (default: the model's)")
    generate.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the GPU if there is one)")
    generate.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on a GPU, float32 on the CPU)")
    generate.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNGs (default ./outputs)")
    generate.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also generate the plain customized image (trigger kept, same seed) and write both side by side "
        "(default: on for the example, off otherwise)",
    )
    generate.set_defaults(run=run_generate)
    from .evaluate import cli as evaluate_cli  # here: the evaluation's CLI uses this module's parse_size

    evaluate = commands.add_parser(
        "evaluate",
        help="measure AlignIT off versus on: CustomConcept101's CLIP and DINO alignment over concepts, prompts, seeds",
        description=evaluate_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate_cli.add_arguments(evaluate)
    evaluate.set_defaults(run=evaluate_cli.run)
    return parser


def _next_number(folder: Path) -> int:
    numbers = [int(match.group(1)) for path in folder.iterdir() if (match := _NUMBERED.match(path.name))]
    return max(numbers, default=0) + 1


def _output_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: a file is in the way")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {path}: {error.strerror}") from error
    return path


def run_generate(args: argparse.Namespace) -> int:
    try:
        import torch

        from .hosts.diffusers import AlignIT, load_pipeline
        from .hosts.diffusers.images import compare_grid, infotext, save_png
        from .hosts.diffusers.sources import locate
    except ImportError as error:
        raise InputError(f"alignit generate needs diffusers: pip install 'alignit[diffusers]' ({error})") from error
    from .infotext import to_infotext

    example = not args.concept
    concepts = [parse_concept(text) for text in (args.concept or [EXAMPLE_CONCEPT])]
    if args.prompt is None and not example:
        raise InputError("--prompt is needed with --concept")
    prompt = EXAMPLE_PROMPT if args.prompt is None else args.prompt
    compare = example if args.compare is None else args.compare
    if args.steps <= 0:
        raise InputError("--steps must be positive")
    out = _output_folder(args.out)

    for concept in concepts:  # a missing source fails before a model is loaded (or downloaded)
        locate(parse_source(concept).name)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    aligned = AlignIT(pipe, concepts)
    rewrite = aligned.rewrite([prompt])[0]
    width, height = args.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    seed = random.randrange(2**32) if args.seed is None else args.seed
    call = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "width": width,
        "height": height,
        "negative_prompt": args.negative_prompt or None,
    }
    parameters: dict[str, Any] = {
        "Steps": args.steps,
        "Sampler": type(pipe.scheduler).__name__,
        "CFG scale": args.guidance,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": args.model,
    }
    number = _next_number(out)
    stem = f"{number:05d}-{seed}"
    written = []
    plain_image = None
    if compare:
        pipe.set_progress_bar_config(desc="plain")
        plain_image = aligned.plain(prompt, generator=torch.Generator().manual_seed(seed), **call).images[0]
        written.append(save_png(plain_image, out / f"{stem}-plain.png", infotext(prompt, args.negative_prompt, parameters)))
    pipe.set_progress_bar_config(desc="AlignIT")
    image = aligned(prompt, generator=torch.Generator().manual_seed(seed), **call).images[0]
    text = infotext(prompt, args.negative_prompt, {**parameters, **to_infotext(aligned.options, aligned.options.concepts)})
    written.append(save_png(image, out / f"{stem}-alignit.png", text))
    if plain_image is not None:
        grid = compare_grid(plain_image, image, (f"plain: {prompt}", f"AlignIT: {rewrite.plain}"))
        written.append(save_png(grid, out / f"{stem}-compare.png", text))
    for path in written:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; user errors give one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        lines = str(error).strip().splitlines()  # a library's message may run on (torch's unpickler explains itself)
        print(f"alignit: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignit: interrupted", file=sys.stderr)
        return 130
