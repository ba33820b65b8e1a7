"""A1111: a concept row's source, found where the WebUI keeps it.

Embeddings come from the WebUI's embedding database, LoRAs from the built-in Lora extension's list (the files are
read by ``alignit.sources.lora``, which keeps the factors low-rank), Custom Diffusion deltas from a folder
(setting ``alignit_custom_diffusion_dir``, default ``models/CustomDiffusion``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules import paths, sd_hijack, shared

from ..concepts import Concept, ConceptError, parse_source
from ..engine import ConceptSource, concept_tokens
from ..kv import attn2_modules, check_fits, text_lora
from ..sources.custom_diffusion import EXTENSIONS, CustomDiffusionDelta, load_custom_diffusion
from ..sources.lora import LoraFactors, load_lora

CD_DIR_OPTION = "alignit_custom_diffusion_dir"


def custom_diffusion_dir() -> Path:
    return Path(getattr(shared.opts, CD_DIR_OPTION, "") or Path(paths.models_path) / "CustomDiffusion")


def custom_diffusion_files() -> dict[str, Path]:
    folder = custom_diffusion_dir()
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix in EXTENSIONS}


def lora_files() -> dict[str, str]:
    """Name → file of every LoRA the built-in Lora extension lists (empty when it is not loaded)."""
    try:
        import networks  # the built-in Lora extension's module, importable once it has loaded
    except ImportError:
        return {}
    return {name: network.filename for name, network in networks.available_network_aliases.items()}


def source_choices() -> list[str]:
    """Every source a concept row can name: embeddings, ``lora:NAME`` and ``cd:NAME``."""
    embeddings = sorted(sd_hijack.model_hijack.embedding_db.word_embeddings, key=str.lower)
    return ["", *embeddings, *(f"lora:{name}" for name in sorted(lora_files())), *(f"cd:{n}" for n in custom_diffusion_files())]


@functools.lru_cache(maxsize=8)
def _lora(path: str, mtime: float) -> LoraFactors:
    return load_lora(path)


@functools.lru_cache(maxsize=8)
def _custom_diffusion(path: str, mtime: float) -> CustomDiffusionDelta:
    return load_custom_diffusion(path)


def resolve_embedding(concept: Concept) -> ConceptSource:
    """The WebUI embedding named by a concept (its source, else its trigger with or without angle brackets)."""
    database = sd_hijack.model_hijack.embedding_db
    names = [concept.source_name]
    if not concept.source.strip():
        names.append(concept.trigger.strip().strip("<>"))
    for name in names:
        embedding = database.word_embeddings.get(name) or next(
            (e for key, e in database.word_embeddings.items() if key.lower() == name.lower()), None
        )
        if embedding is not None:
            return ConceptSource.embedding(embedding.name, int(embedding.vectors), embedding)
        if name in database.skipped_embeddings:
            raise ConceptError(f"concept '{concept.trigger}': embedding '{name}' was made for another model family")
    raise ConceptError(f"concept '{concept.trigger}': no embedding named '{concept.source_name}' is loaded")


def resolve(concept: Concept, encoder: Any, unet: Any, lora_scope: str, warn: Callable[[str], None]) -> ConceptSource:
    """The concept's source, checked against the loaded model; ConceptError says what is wrong, ``warn`` what is
    left out."""
    spec = parse_source(concept)
    if spec.kind == "embedding":
        return resolve_embedding(concept)
    modules = attn2_modules(unet)
    if spec.kind == "lora":
        path = lora_files().get(spec.name)
        if path is None:
            raise ConceptError(f"concept '{concept.trigger}': no LoRA named '{spec.name}' in the WebUI's LoRA list")
        factors = _lora(path, Path(path).stat().st_mtime)
        if not factors.kv and not factors.text:
            raise ConceptError(
                f"LoRA '{spec.name}' has no cross-attention (attn2 to_k/to_v) or text-encoder weights: "
                "AlignIT cannot confine it to the concept"
            )
        kv = {key: projection.times(spec.weight) for key, projection in factors.kv.items()}
        check_fits(f"LoRA '{spec.name}'", kv, modules)
        text = {key: projection.times(spec.weight) for key, projection in factors.text.items()}
        if factors.text_2:
            warn(f"LoRA '{spec.name}': its OpenCLIP-G text-encoder part is not applied to the concept (CLIP-L's is)")
        tokens, fixes = concept_tokens(encoder, concept.trigger, {})
        return ConceptSource(
            f"lora:{spec.name}",
            tokens,
            fixes,
            text_patch=functools.partial(text_lora, encoder.text_model, text) if text else None,
            kv=kv if lora_scope == "kv" else {},
            global_kv=kv if lora_scope == "full" else {},
        )
    path = custom_diffusion_files().get(spec.name)
    if path is None:
        raise ConceptError(f"concept '{concept.trigger}': no Custom Diffusion delta '{spec.name}' in {custom_diffusion_dir()}")
    delta = _custom_diffusion(str(path), path.stat().st_mtime)
    check_fits(f"Custom Diffusion delta '{spec.name}'", delta.kv, modules)
    for token, vectors in delta.modifier_tokens.items():
        if vectors.shape[-1] != encoder.width:
            raise ConceptError(
                f"'{spec.name}': modifier token {token} is {vectors.shape[-1]} wide, this text encoder {encoder.width}"
            )
    tokens, fixes = concept_tokens(encoder, concept.trigger, delta.modifier_tokens)
    return ConceptSource(f"cd:{spec.name}", tokens, fixes, kv=delta.kv)
