"""Forge: embeddings from the text engines' own databases; LoRA files read safely by AlignIT and mapped with
Forge's own key maps (``backend/patcher/lora.py``: ``model_lora_keys_unet``/``model_lora_keys_clip``,
``load_lora``); Custom Diffusion as in ``webui_sources``."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from backend.patcher.lora import load_lora, merge_lora_to_weight, model_lora_keys_clip, model_lora_keys_unet
from modules import shared

from ...concepts import Concept, SourceSpec
from ...engine import ConceptSource
from ...errors import ConceptError, NotLoaded, Unsupported
from ...kv import Delta, Dense, Key, LowRank
from ...kv_hooks import attn2_modules
from ...sources.files import flatten, load_tensors, read_cached
from ...sources.lora import refuse_ia3
from ...sources.names import text_module
from ...text_lora import tower_loras
from . import sources as webui_sources
from .forge_encoder import ForgeEncoder, text_engines

_UNET_KV = re.compile(r"^diffusion_model\.(?P<layer>.+\.attn2)\.to_(?P<proj>[kv])\.weight$")


def embedding_names() -> list[str]:
    """The embeddings the loaded model's first text engine knows; before Forge loads a model (at the first
    generation), those its Textual Inversion page lists, from a database that needs no model."""
    try:
        return list(text_engines(shared.sd_model)[0].embeddings.word_embeddings)
    except NotLoaded:
        from modules import ui_extra_networks_textual_inversion  # loads the embeddings folder when first imported

        return list(ui_extra_networks_textual_inversion.embedding_db.word_embeddings)
    except Unsupported:  # a model AlignIT does not apply to
        return []


def _delta(patch: tuple, strength: float, weight: torch.Tensor | None, key: str) -> Delta:
    """A Forge UNet/CLIP patch ``(type, data)`` as ``ΔW`` at ``strength``: a plain LoRA stays low-rank, other types
    (LoHa, LoKr, DoRA, …) are merged into the base weight by Forge's own ``merge_lora_to_weight``."""
    kind, data = patch
    if kind == "lora" and data[3] is None and data[4] is None:
        up, down, alpha = data[0].float(), data[1].float(), data[2]
        rank = down.shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        return LowRank(down.reshape(rank, -1), up.reshape(up.shape[0], rank), scale * strength)
    if weight is None or not weight.is_floating_point() or weight.ndim != 2:
        raise ConceptError(f"{key}: a '{kind}' LoRA part needs a plain weight to merge with, and this model's is not")
    base = weight.detach().float().cpu()
    return Dense(merge_lora_to_weight([(strength, patch, 1.0, None, None)], base.clone(), key) - base)


# What AlignIT uses of a LoRA file (cross-attention K/V and text-encoder parts, in every naming scheme Forge's key maps
# read): the file cache keeps only these tensors.
_USED = re.compile(
    r"attn2[._](?:processor[._])?to_[kv](?![a-z])"  # cross-attention K/V
    r"|^(?:lora_te[12]?_|text_encoder|te[12]?[._]|clip_[lg]|cond_stage_model|conditioner)"  # text encoders
)


def _tensors(path: str) -> Mapping[str, torch.Tensor]:
    return {key: value for key, value in flatten(load_tensors(path)).items() if _USED.search(key)}


def lora_parts(
    sd_model: Any, encoder: ForgeEncoder, tensors: Mapping[str, torch.Tensor], strength: float
) -> tuple[dict[Key, Delta], list[dict[str, Delta]], int]:
    """A LoRA's cross-attention K/V parts and per text engine parts at ``strength``, and how many of its
    modules match nothing in this model."""
    refuse_ia3(tensors, "Forge's LoRA loader")
    original = sd_model.forge_objects_original
    unet_model, clip_model = original.unet.model, original.clip.cond_stage_model
    unet_patches, rest = load_lora(dict(tensors), model_lora_keys_unet(unet_model, {}))
    clip_patches, rest = load_lora(rest, model_lora_keys_clip(clip_model, {}))
    parameters = dict(unet_model.named_parameters())
    kv: dict[Key, Delta] = {}
    for key, patch in unet_patches.items():
        match = _UNET_KV.match(key)
        if match:
            kv[(match["layer"], match["proj"])] = _delta(patch, strength, parameters.get(key), key)
    clip_parameters = dict(clip_model.named_parameters())
    text: list[dict[str, Delta]] = []
    for engine in encoder.engines:
        prefix = f"{engine.embedding_key}.transformer."
        text.append(
            {
                text_module(key[len(prefix) : -len(".weight")]): _delta(patch, strength, clip_parameters.get(key), key)
                for key, patch in clip_patches.items()
                if key.startswith(prefix) and key.endswith(".weight")
            }
        )
    unmatched = len({key.split(".")[0] for key in rest if not key.endswith(".alpha")})
    return kv, text, unmatched


@dataclass
class ForgeSources:
    """``SourceResolver`` for Forge's loaded model."""

    encoder: ForgeEncoder
    sd_model: Any
    lora_scope: str

    def _modules(self) -> dict[Key, torch.nn.Module]:
        return attn2_modules(self.sd_model.forge_objects.unet.model.diffusion_model)

    def embedding(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        embedding = webui_sources.find_embedding(concept, self.encoder.engines[0].embeddings)
        return ConceptSource.embedding(embedding.name, int(embedding.vectors), embedding)

    def custom_diffusion(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        return webui_sources.resolve_custom_diffusion(concept, self.encoder, self._modules())

    def lora(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        tensors = read_cached(_tensors, webui_sources.lora_file(concept))
        try:
            kv, text, unmatched = lora_parts(self.sd_model, self.encoder, tensors, spec.weight)
        except ConceptError as error:
            raise ConceptError(f"LoRA '{spec.name}': {error}") from error
        text_patch = functools.partial(tower_loras, self.encoder.towers, text) if any(text) else None
        return webui_sources.resolve_lora(
            concept, self.encoder, self._modules(), kv, text_patch, self.lora_scope, other_family=bool(unmatched)
        )
