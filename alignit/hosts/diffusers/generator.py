"""Loading a pipeline AlignIT runs on, and one concept's image generator (the evaluation's ``image_generator``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ...concepts import Concept
from ...errors import InputError
from .flow import AlignIT, check_pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> str:
    return "float32" if torch.device(device).type == "cpu" else "float16"


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--device {name!r}: {error}") from error
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise InputError(f"--device {name}: no {device.type} device is available here")
    return device


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None) -> Any:
    """The txt2img pipeline of a hub id or a local diffusers folder, on ``device`` in ``dtype`` (defaults: the GPU in
    float16 when there is one, else the CPU in float32). InputError when it cannot be loaded, Unsupported when AlignIT
    does not run on it."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    target = _device(device)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    path = Path(model).expanduser()
    if path.is_file():
        raise InputError(f"{model} is a single file: give a diffusers model folder or a hub id")
    if not path.is_dir() and not _HUB_ID.match(model):
        raise InputError(f"no model folder '{model}'")
    from diffusers import AutoPipelineForText2Image

    try:
        pipe = AutoPipelineForText2Image.from_pretrained(str(path) if path.is_dir() else model, dtype=DTYPES[dtype])
    except Exception as error:  # a folder that is no model, no such hub id, offline: each loader raises its own type
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(f"cannot load the model '{model}': {type(error).__name__}: {reason}") from error
    check_pipeline(pipe)
    return pipe.to(target)


class Settings(Protocol):
    """How the images are generated (the evaluation's ``GenerationSettings``)."""

    model: str
    steps: int
    guidance: float
    width: int
    height: int
    device: str
    dtype: str
    negative_prompt: str


class ConceptLike(Protocol):
    trigger: str
    class_word: str
    source: str
    strength: float


@dataclass
class ConceptImages:
    """One concept's images on a pipeline loaded once; ``generate`` makes one image per call."""

    alignit: AlignIT
    settings: Settings

    def generate(self, prompt: str, seed: int, aligned: bool) -> Image.Image:
        """``prompt`` holds the trigger. ``aligned``: AlignIT on; else the plain customized pipeline (trigger kept).
        The seed drives a CPU generator, so an image does not depend on the device."""
        settings = self.settings
        arguments = {
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance,
            "width": settings.width,
            "height": settings.height,
            "negative_prompt": settings.negative_prompt or None,
            "generator": torch.Generator().manual_seed(seed),
        }
        output = self.alignit(prompt, **arguments) if aligned else self.alignit.plain(prompt, **arguments)
        return output.images[0]


def image_generator(concept: ConceptLike, settings: Settings) -> ConceptImages:
    """The evaluation's generator for one concept (``trigger``, ``class_word``, ``source``, ``strength``): the model
    of ``settings`` loaded once, the concept's source read and checked once."""
    pipe = load_pipeline(settings.model, settings.device, settings.dtype)
    aligned = AlignIT(pipe, [Concept(concept.trigger, concept.class_word, concept.source, concept.strength)])
    return ConceptImages(aligned, settings)
