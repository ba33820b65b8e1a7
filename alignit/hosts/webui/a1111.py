"""The AUTOMATIC1111 WebUI host (v1.10): its text encoder, sources and K/V forward hooks on the ldm UNet.

The generation flow is ``alignit.hosts.webui``'s. Weight-side concepts get forward hooks on the UNet's
``attn2.to_k``/``to_v`` for each sampling pass; they come off in ``postprocess_batch``, and hooks left by an error
retire themselves (they check the job) or are removed when the next generation begins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from modules import shared

from ...attention_maps import MapRecorder
from ...concepts import Concept
from ...engine import ConceptSource, Splicer, TextEncoder, resolve_source
from ...errors import NotLoaded, Unsupported
from ...kv_hooks import KVInjector, attn2_modules
from . import a1111_maps, a1111_sources
from .a1111_encoder import A1111Encoder

_live_injectors: list[KVInjector] = []


def retire_hooks() -> None:
    """Remove every K/V hook AlignIT installed (normally none is left between generations)."""
    while _live_injectors:
        _live_injectors.pop().remove()


def _check_unet_reachable() -> None:
    """Weight-side concepts need the UNet's own cross-attention modules and the conditioning's own rows."""
    if getattr(shared, "loaded_hypernetworks", None):
        raise Unsupported("a hypernetwork is active: it rewrites the conditioning before to_k/to_v, where AlignIT works")
    current_unet = getattr(getattr(shared, "sd_unet", None), "current_unet", None)
    if current_unet is not None:
        raise Unsupported(f"the UNet is replaced by {type(current_unet).__name__}, which bypasses its cross-attention modules")


class A1111Host:
    """``alignit.hosts.webui.Host`` for A1111."""

    def begin(self) -> None:
        retire_hooks()
        a1111_maps.retire()

    def encoder(self) -> TextEncoder:
        if shared.sd_model is None:
            raise NotLoaded("no checkpoint is loaded yet")
        return A1111Encoder(shared.sd_model.cond_stage_model)

    def resolve(self, concept: Concept, encoder: Any, lora_scope: str, warn: Callable[[str], None]) -> ConceptSource:
        resolver = a1111_sources.A1111Sources(encoder, shared.sd_model.model.diffusion_model, lora_scope, warn)
        source = resolve_source(concept, resolver)
        if source.weight_side:
            _check_unet_reachable()
        return source

    def install_kv(self, p: Any, splicer: Splicer) -> KVInjector | None:
        chunks, global_kv = splicer.kv_chunks(), splicer.global_kv()
        if not (chunks or global_kv):
            return None
        retire_hooks()
        job = shared.state.job_timestamp
        injector = KVInjector(
            shared.sd_model.model.diffusion_model,
            chunks,
            splicer.kv_weights(),
            global_kv,
            is_current=lambda: shared.state.job_timestamp == job,
        )
        _live_injectors.append(injector)
        return injector

    def install_maps(self, p: Any, recorder: MapRecorder, cond_items: Sequence[int]) -> a1111_maps.MapHooks:
        a1111_maps.retire()
        job = shared.state.job_timestamp
        return a1111_maps.MapHooks(
            shared.sd_model.model.diffusion_model, recorder, cond_items, is_current=lambda: shared.state.job_timestamp == job
        )

    def source_choices(self) -> list[str]:
        return a1111_sources.source_choices()

    def grad_mode(self) -> contextlib.AbstractContextManager:
        """A1111 encodes and samples under ``torch.no_grad()``."""
        return torch.no_grad()

    def load_model(self) -> None:
        """Nothing to do: reading ``shared.sd_model`` loads the selected checkpoint when none is loaded."""

    def cross_attention(self) -> dict[tuple[str, str], torch.nn.Module]:
        return attn2_modules(shared.sd_model.model.diffusion_model)
