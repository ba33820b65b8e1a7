"""The narrow protocol between the evaluation and whatever generates its images.

A factory builds one generator per concept (its customized model is loaded once); the generator makes the job's two
images with the same seed. The default factory is the diffusers host's; ``--generator MODULE:FACTORY`` names any other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from ..errors import InputError
from .inputs import EvalConcept

DEFAULT_GENERATOR = "alignit.hosts.diffusers:image_generator"


@dataclass(frozen=True)
class GenerationSettings:
    """How every image is generated; ``device`` is the process's own under ``accelerate launch``."""

    model: str
    steps: int
    guidance: float
    width: int
    height: int
    device: str
    dtype: str
    negative_prompt: str = ""


class ImageGenerator(Protocol):
    """One concept's generator; an optional ``close()`` is called once its jobs are done."""

    def generate(self, prompt: str, seed: int, aligned: bool) -> Image.Image:
        """``prompt`` holds the concept's trigger. ``aligned=False``: the plain customized image (trigger kept,
        AlignIT off); ``aligned=True``: AlignIT on (trigger -> class word, concept rows from p')."""
        ...


GeneratorFactory = Callable[[EvalConcept, GenerationSettings], ImageGenerator]


def load_factory(spec: str | None) -> GeneratorFactory:
    """Resolve ``MODULE:FACTORY`` (default: the diffusers host's) by import; raise InputError in one line."""
    spec = spec or DEFAULT_GENERATOR
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"--generator {spec!r}: write it as MODULE:FACTORY")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if spec == DEFAULT_GENERATOR:
            raise InputError(
                f"the diffusers host ({module_name}) is not available ({error}); pass --generator MODULE:FACTORY"
            ) from error
        raise InputError(f"--generator {spec}: cannot import {module_name} ({error})") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"--generator {spec}: {module_name} has no callable {attribute}")
    return factory
