"""The Stable Diffusion WebUI Forge host: its text engines, sources, and ``attn2`` patches on a cloned UNet.

The generation flow is ``alignit.hosts.webui``'s (Forge keeps A1111's hook order and ``prompt_parser``). Weight-side
concepts: in ``process_before_every_sampling`` (first pass, and each hires call, after Forge has reset
``forge_objects``) the current UNet patcher is cloned, AlignIT's patches go on the clone and the clone becomes
``p.sd_model.forge_objects.unet``; Forge drops it with the next reset, so nothing outlives the pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from backend import attention
from modules import sd_models, shared

from ...attention_maps import MapRecorder
from ...concepts import Concept
from ...engine import ConceptSource, Splicer, TextEncoder, resolve_source
from ...kv import Key, KVRewriter
from ...kv_hooks import attn2_modules, module_projection
from . import forge_sources
from . import sources as webui_sources
from .forge_attention import AttentionPatch
from .forge_encoder import ForgeEncoder
from .forge_maps import MapPatch


class ForgeHost:
    """``alignit.hosts.webui.Host`` for Forge."""

    def begin(self) -> None:
        """Nothing to undo: AlignIT's patches only ever sit on UNet clones Forge discards."""

    def encoder(self) -> TextEncoder:
        return ForgeEncoder(shared.sd_model)

    def resolve(self, concept: Concept, encoder: Any, lora_scope: str, warn: Callable[[str], None]) -> ConceptSource:
        return resolve_source(concept, forge_sources.ForgeSources(encoder, shared.sd_model, lora_scope))

    def install_kv(self, p: Any, splicer: Splicer) -> AttentionPatch | None:
        chunks, global_kv = splicer.kv_chunks(), splicer.global_kv()
        if not (chunks or global_kv):
            return None
        unet = p.sd_model.forge_objects.unet.clone()
        project = module_projection(attn2_modules(unet.model.diffusion_model))
        rewriter = KVRewriter(chunks, splicer.kv_weights(), global_kv, project)
        patch = AttentionPatch(rewriter, attention.attention_function)
        patch.install(unet)
        p.sd_model.forge_objects.unet = unet
        return patch

    def install_maps(self, p: Any, recorder: MapRecorder, cond_items: Sequence[int]) -> MapPatch:
        unet = p.sd_model.forge_objects.unet.clone()
        patch = MapPatch(recorder, attention.attention_function)
        patch.install(unet)
        p.sd_model.forge_objects.unet = unet
        return patch

    def source_choices(self) -> list[str]:
        return webui_sources.source_choices(forge_sources.embedding_names())

    def load_model(self) -> None:
        """Forge loads a checkpoint at the first generation (processing.py 804): do the same here."""
        sd_models.forge_model_reload()

    def grad_mode(self) -> contextlib.AbstractContextManager:
        """Forge loads and patches its models under inference mode (sd_models.py 472, processing.py 911): work with
        them outside it (Suggest before a first generation) left tensors that broke every later generation."""
        return torch.inference_mode()

    def cross_attention(self) -> dict[Key, torch.nn.Module]:
        return attn2_modules(shared.sd_model.forge_objects.unet.model.diffusion_model)
