"""A text-encoder LoRA applied functionally while p' is encoded: forward hooks add ``ΔW·x`` to each matched linear
layer's output, so no weight of the host's text encoder ever changes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from .errors import ConceptError
from .kv import Delta, is_linear


@contextlib.contextmanager
def text_lora(text_model: torch.nn.Module, factors: Mapping[str, Delta]) -> Iterator[None]:
    """Apply a text-encoder LoRA functionally (``y + ΔW·x`` on each matched Linear) while the block runs."""
    modules = {}
    for name, module in text_model.named_modules():
        if is_linear(module):
            modules[name.replace(".", "_").removeprefix("text_model_")] = module
    unknown = [name for name in factors if name not in modules]
    if unknown:
        raise ConceptError(f"the LoRA's text-encoder part names {unknown[0]}, which this text encoder does not have")
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, p=projection: o + p.delta(i[0]).to(o.dtype))
        for name, projection in factors.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
