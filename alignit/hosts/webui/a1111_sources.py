"""A1111: embeddings from the WebUI's embedding database; LoRA files from the Lora extension's list, read by
``alignit.sources.lora`` (which keeps the factors low-rank); Custom Diffusion as in ``webui_sources``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from modules import sd_hijack

from ...concepts import Concept, SourceSpec
from ...engine import ConceptSource
from ...kv_hooks import attn2_modules
from ...sources.files import read_cached
from ...sources.lora import LoraFactors, load_lora
from ...text_lora import text_lora
from . import sources as webui_sources


def source_choices() -> list[str]:
    return webui_sources.source_choices(sd_hijack.model_hijack.embedding_db.word_embeddings)


@dataclass
class A1111Sources:
    """``SourceResolver`` for A1111's loaded model: ``warn`` says what of a source is left out."""

    encoder: Any
    unet: torch.nn.Module
    lora_scope: str
    warn: Callable[[str], None]

    def embedding(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        embedding = webui_sources.find_embedding(concept, sd_hijack.model_hijack.embedding_db)
        return ConceptSource.embedding(embedding.name, int(embedding.vectors), embedding)

    def custom_diffusion(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        return webui_sources.resolve_custom_diffusion(concept, self.encoder, attn2_modules(self.unet))

    def lora(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        factors: LoraFactors = read_cached(load_lora, webui_sources.lora_file(concept))
        kv = {key: projection.times(spec.weight) for key, projection in factors.kv.items()}
        text = {key: projection.times(spec.weight) for key, projection in factors.text.items()}
        if factors.text_2:
            self.warn(f"LoRA '{spec.name}': its OpenCLIP-G text-encoder part is not applied to the concept (CLIP-L's is)")
        text_patch = functools.partial(text_lora, self.encoder.text_model, text) if text else None
        return webui_sources.resolve_lora(concept, self.encoder, attn2_modules(self.unet), kv, text_patch, self.lora_scope)
