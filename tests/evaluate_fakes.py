"""A deterministic stand-in for the diffusers host's image generator (``--generator evaluate_fakes:factory``).

Its image depends on (source, prompt, seed, aligned) through a hash. Environment, for the robustness tests:
EVAL_FAKE_MARKERS: a folder that gets one new file per finished generation;
EVAL_FAKE_KILL_AT: k: the process kills itself (SIGKILL) halfway through the (k+1)-th job, after its plain image;
EVAL_FAKE_FAIL: prompts containing this text raise an out-of-memory error.
"""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from pathlib import Path

import torch
from evaluate_parts import blocks_image


class FakeGenerator:
    def __init__(self, concept, settings) -> None:
        self.concept, self.settings = concept, settings
        self.closed = False

    def generate(self, prompt: str, seed: int, aligned: bool):
        assert not self.closed
        fail = os.environ.get("EVAL_FAKE_FAIL")
        if fail and fail in prompt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        markers = os.environ.get("EVAL_FAKE_MARKERS")
        kill_at = os.environ.get("EVAL_FAKE_KILL_AT")
        if aligned and markers and kill_at and len(list(Path(markers).glob("*-on-*"))) == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        key = f"{self.concept.source}|{prompt}|{seed}|{aligned}".encode()
        image = blocks_image(
            int.from_bytes(hashlib.sha256(key).digest()[:8], "little"), (self.settings.width, self.settings.height)
        )
        if markers:
            name = f"{self.concept.name}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}-{seed}-{'on' if aligned else 'off'}"
            (Path(markers) / f"{name}-{uuid.uuid4().hex}").touch()
        return image

    def close(self) -> None:
        self.closed = True


def factory(concept, settings) -> FakeGenerator:
    return FakeGenerator(concept, settings)


def broken_factory(concept, settings) -> FakeGenerator:
    if concept.name == "mug":
        raise ValueError(f"cannot read {concept.source}")
    return FakeGenerator(concept, settings)
