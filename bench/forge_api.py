"""Generation time with AlignIT on vs off on a real Forge, through its API, in one run.

Starts the Forge named by ``ALIGNIT_FORGE_DIR`` (as tests/test_forge_integration.py does: ``ALIGNIT_FORGE_PYTHON``,
``ALIGNIT_FORGE_ARGS`` with a ``--ckpt``), with the integration tests' SD1.5 sources, and times txt2img requests
interleaved on, off, off, on. "Off" is what a user runs without AlignIT: the same prompt with the embedding's name,
or with the LoRA's tag (``<lora:NAME:0.8>``, merged into the UNet by Forge); "on" is AlignIT with that concept
("kv" scope for the LoRA: the UNet keeps its base weights and the patches rewrite the concept's keys/values).

    ALIGNIT_FORGE_DIR=… ALIGNIT_FORGE_ARGS="--ckpt …" .venv/bin/python bench/forge_api.py --concept lora --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from test_forge_integration import CPU  # noqa: E402
from webui_server import EMBEDDING, LORA, on, started, txt2img  # noqa: E402

PROMPT = "a photo of {} playing badminton in a garden, detailed, sharp focus"


class _Folders:
    """Stands in for pytest's ``tmp_path_factory``."""

    def __init__(self, root: str):
        self.root = Path(root)

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path


def requests(concept: str) -> tuple[dict, dict]:
    """(off, on) txt2img arguments for one kind of concept."""
    if concept == "ti":
        return {"prompt": PROMPT.format(EMBEDDING)}, {
            "prompt": PROMPT.format(EMBEDDING),
            "alignit": on((EMBEDDING, "man", EMBEDDING)),
        }
    return {"prompt": PROMPT.format("ohwx") + f" <lora:{LORA}:0.8>"}, {
        "prompt": PROMPT.format("ohwx"),
        "alignit": on(("ohwx", "man", f"lora:{LORA}:0.8"), lora_scope="kv"),
    }


def timed(url: str, request: dict, size: int, steps: int) -> float:
    start = time.perf_counter()
    _, info = txt2img(url, request["prompt"], request.get("alignit"), steps=steps, width=size, height=size)
    elapsed = time.perf_counter() - start
    if "AlignIT warning" in info["infotexts"][0]:
        raise SystemExit(f"AlignIT warned: {info['infotexts'][0]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=("ti", "lora"), default="lora")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="on/off pairs, interleaved on, off, off, on")
    options = parser.parse_args()
    off, on_ = requests(options.concept)
    with tempfile.TemporaryDirectory() as folder, started("ALIGNIT_FORGE", CPU, _Folders(folder)) as url:
        for request in (off, on_):  # warm-up: model load, file hashes, first LoRA merge
            timed(url, request, options.size, options.steps)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(options.repeats):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                times[name].append(timed(url, on_ if name == "on" else off, options.size, options.steps))
    median_off, median_on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"concept: {options.concept}; Forge, {options.size}x{options.size}, {options.steps} steps, {options.repeats} pairs")
    print(f"off: {', '.join(f'{t:.2f}' for t in times['off'])} s; on: {', '.join(f'{t:.2f}' for t in times['on'])} s")
    print(f"median generation time on / off: {median_on / median_off:.4f} ({median_on:.2f} s / {median_off:.2f} s)")


if __name__ == "__main__":
    main()
