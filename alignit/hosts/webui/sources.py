"""Where a concept's source is found in either WebUI: embedding databases of the same shape, the built-in Lora
extension's list (``networks``, in both), and AlignIT's Custom Diffusion folder (setting
``alignit_custom_diffusion_dir``, default ``models/CustomDiffusion``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from modules import paths, shared

from ...concepts import Concept, parse_source
from ...engine import ConceptSource, concept_tokens
from ...errors import ConceptError
from ...kv import Delta, Key, check_fits
from ...sources.custom_diffusion import EXTENSIONS, CustomDiffusionDelta, load_custom_diffusion
from ...sources.files import read_cached

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


def lora_file(concept: Concept) -> str:
    """The file of the LoRA a concept names; ConceptError when the WebUI does not list it."""
    name = parse_source(concept).name
    path = lora_files().get(name)
    if path is None:
        raise ConceptError(f"concept '{concept.trigger}': no LoRA named '{name}' in the WebUI's LoRA list")
    return path


def source_choices(embedding_names: Iterable[str]) -> list[str]:
    """Every source a concept row can name: embeddings, ``lora:NAME`` and ``cd:NAME`` (no empty entry: an empty source,
    the trigger's own name, is what the field holds until one is chosen)."""
    embeddings = sorted(embedding_names, key=str.lower)
    return [*embeddings, *(f"lora:{name}" for name in sorted(lora_files())), *(f"cd:{n}" for n in custom_diffusion_files())]


def find_embedding(concept: Concept, database: Any) -> Any:
    """The embedding a concept names (its source, else its trigger with or without angle brackets), from a
    database with ``word_embeddings`` and ``skipped_embeddings`` (both WebUIs' ``EmbeddingDatabase``)."""
    names = [concept.source_name]
    if not concept.source.strip():
        names.append(concept.trigger.strip().strip("<>"))
    for name in names:
        embedding = database.word_embeddings.get(name) or next(
            (e for key, e in database.word_embeddings.items() if key.lower() == name.lower()), None
        )
        if embedding is not None:
            return embedding
        if name in database.skipped_embeddings:
            raise ConceptError(f"concept '{concept.trigger}': embedding '{name}' was made for another model family")
    raise ConceptError(f"concept '{concept.trigger}': no embedding named '{concept.source_name}' is loaded")


def resolve_custom_diffusion(concept: Concept, encoder: Any, modules: dict[Key, Any]) -> ConceptSource:
    """A ``cd:NAME`` concept: the delta's K/V weights, checked against the UNet's modules, and its modifier tokens."""
    name = parse_source(concept).name
    path = custom_diffusion_files().get(name)
    if path is None:
        raise ConceptError(f"concept '{concept.trigger}': no Custom Diffusion delta '{name}' in {custom_diffusion_dir()}")
    delta: CustomDiffusionDelta = read_cached(load_custom_diffusion, path)
    check_fits(f"Custom Diffusion delta '{name}'", delta.kv, modules)
    for token, vectors in delta.modifier_tokens.items():
        if vectors.shape[-1] != encoder.width:
            raise ConceptError(f"'{name}': modifier token {token} is {vectors.shape[-1]} wide, this text encoder {encoder.width}")
    tokens, fixes = concept_tokens(encoder, concept.trigger, delta.modifier_tokens)
    return ConceptSource(f"cd:{name}", tokens, fixes, kv=delta.kv)


def resolve_lora(
    concept: Concept,
    encoder: Any,
    modules: dict[Key, Any],
    kv: Mapping[Key, Delta],
    text_patch: Callable[[], contextlib.AbstractContextManager[None]] | None,
    lora_scope: str,
    other_family: bool = False,
) -> ConceptSource:
    """A ``lora:NAME`` concept from its K/V parts (checked against the UNet's modules) and its text-encoder patch;
    ``other_family``: its keys named modules this model does not have."""
    name = parse_source(concept).name
    if not kv and text_patch is None:
        why = "was made for another model family" if other_family else "has no attn2 to_k/to_v or text-encoder weights"
        raise ConceptError(f"LoRA '{name}' {why}: AlignIT cannot confine it to the concept")
    check_fits(f"LoRA '{name}'", kv, modules)
    tokens, fixes = concept_tokens(encoder, concept.trigger, {})
    return ConceptSource(
        f"lora:{name}",
        tokens,
        fixes,
        text_patch=text_patch,
        kv=kv,
        global_kv=kv if lora_scope == "full" else {},
    )


def embedding_handle(name: str, vectors: torch.Tensor, is_sdxl: bool) -> Any:
    """What both WebUIs' embedding layers read from an embedding (A1111's ``sd_hijack.EmbeddingsWithFixes``, Forge's
    ``CLIPEmbeddingForTextualInversion``): ``vec`` and ``vectors``; an SDXL model needs one tensor per encoder."""
    if is_sdxl:
        raise ConceptError(f"'{name}' holds one text encoder's vectors; an SDXL model needs clip_l and clip_g")
    return SimpleNamespace(name=name, vec=vectors, vectors=vectors.shape[0])
