"""A1111: embeddings from the WebUI's embedding database; LoRA files from the Lora extension's list, read by
``alignit.sources.lora`` (which keeps the factors low-rank); Custom Diffusion as in ``webui_sources``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from modules import sd_hijack

from ..concepts import Concept, parse_source
from ..engine import ConceptSource
from ..kv import attn2_modules, text_lora
from ..sources.files import read_cached
from ..sources.lora import LoraFactors, load_lora
from . import webui_sources


def source_choices() -> list[str]:
    return webui_sources.source_choices(sd_hijack.model_hijack.embedding_db.word_embeddings)


def resolve_embedding(concept: Concept) -> ConceptSource:
    """The WebUI embedding named by a concept."""
    embedding = webui_sources.find_embedding(concept, sd_hijack.model_hijack.embedding_db)
    return ConceptSource.embedding(embedding.name, int(embedding.vectors), embedding)


def resolve(concept: Concept, encoder: Any, unet: Any, lora_scope: str, warn: Callable[[str], None]) -> ConceptSource:
    """The concept's source, checked against the loaded model; ConceptError says what is wrong, ``warn`` what is
    left out."""
    spec = parse_source(concept)
    if spec.kind == "embedding":
        return resolve_embedding(concept)
    modules = attn2_modules(unet)
    if spec.kind == "cd":
        return webui_sources.resolve_custom_diffusion(concept, encoder, modules)
    factors: LoraFactors = read_cached(load_lora, webui_sources.lora_file(concept))
    kv = {key: projection.times(spec.weight) for key, projection in factors.kv.items()}
    text = {key: projection.times(spec.weight) for key, projection in factors.text.items()}
    if factors.text_2:
        warn(f"LoRA '{spec.name}': its OpenCLIP-G text-encoder part is not applied to the concept (CLIP-L's is)")
    text_patch = functools.partial(text_lora, encoder.text_model, text) if text else None
    return webui_sources.resolve_lora(concept, encoder, modules, kv, text_patch, lora_scope)
