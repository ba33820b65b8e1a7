"""Where a concept comes from in ComfyUI: a file of its ``embeddings`` or ``loras`` folders, or of the
``custom_diffusion`` folder AlignIT registers with ``folder_paths`` (``models/custom_diffusion``, more through
``extra_model_paths.yaml``).

Every file is read by AlignIT's own readers (``sources.files.load_tensors``: safetensors, or pickles through an
allowlist unpickler; nothing in a file is run). An embedding's vectors are the ones ComfyUI's ``load_embed`` would
take; a LoRA is mapped with ComfyUI's own key maps and adapters (``comfy.lora``), as its LoraLoader maps it: the
cross-attention K/V parts go to the K/V rewriting, the text-encoder part to a CLIP clone that encodes only p', and in
the "full" scope the rest of the UNet part to AlignIT's MODEL clone.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import comfy.lora
import comfy.lora_convert
import folder_paths
import torch
from comfy.weight_adapter import LoRAAdapter

from ...concepts import Concept, SourceKind, SourceSpec
from ...engine import ConceptSource, concept_tokens
from ...errors import ConceptError
from ...kv import Delta, Dense, Key, LowRank, check_fits
from ...kv_hooks import attn2_modules
from ...sources.custom_diffusion import EXTENSIONS, CustomDiffusionDelta, load_custom_diffusion
from ...sources.files import flatten, load_tensors, read_cached
from ...sources.lora import parse_lora, refuse_ia3
from .encoder import ComfyEncoder, unet

CD_FOLDER = "custom_diffusion"
FOLDERS = {"embeddings": SourceKind.EMBEDDING, "loras": SourceKind.LORA, CD_FOLDER: SourceKind.CUSTOM_DIFFUSION}
_UNET_KV = re.compile(r"^diffusion_model\.(?P<layer>.+\.attn2)\.to_(?P<proj>[kv])\.weight$")


def register_custom_diffusion_folder() -> None:
    """``models/custom_diffusion`` as a ``folder_paths`` folder of weight files (after any set in extra_model_paths)."""
    default = os.path.join(folder_paths.models_dir, CD_FOLDER)
    folders = list(folder_paths.folder_names_and_paths.get(CD_FOLDER, ([], set()))[0])
    folder_paths.folder_names_and_paths[CD_FOLDER] = ([*folders, default] if default not in folders else folders, set(EXTENSIONS))


def source_choices() -> list[str]:
    """Every file a concept can come from, as ``folder/file`` (``loras/my_lora.safetensors``)."""
    choices = []
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            choices += [f"{folder}/{name}" for name in folder_paths.get_filename_list(folder)]
    return choices


def core_source(choice: str, lora_weight: float) -> str:
    """A ``folder/file`` choice in the core's source syntax: ``lora:FILE:WEIGHT``, ``cd:FILE`` or the embedding's file."""
    folder, _, name = choice.partition("/")
    kind = FOLDERS.get(folder)
    if kind is None or not name:
        raise ConceptError(f"'{choice}' names no file of ComfyUI's embeddings, loras or {CD_FOLDER} folders")
    if kind is SourceKind.LORA:
        return f"lora:{name}:{lora_weight!r}"
    return f"cd:{name}" if kind is SourceKind.CUSTOM_DIFFUSION else name


def embedding_vectors(tree: Mapping[str, Any], key: str) -> torch.Tensor:
    """The vectors ComfyUI's ``load_embed`` takes from an embedding file (comfy/sd1_clip.py 443-464): A1111's
    ``string_to_param``, else the text encoder's own key (``clip_l``, ``clip_g``), else the first tensor."""
    if "string_to_param" in tree and isinstance(tree["string_to_param"], Mapping):
        value = next(iter(tree["string_to_param"].values()), None)
    else:
        value = tree.get(key, next(iter(tree.values()), None))
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim not in (1, 2) or not value.numel():
        raise ConceptError("it holds no embedding vectors")
    return value.float().reshape(-1, value.shape[-1])


@dataclass
class LoraParts:
    """A LoRA as ComfyUI maps it onto a MODEL and a CLIP: ``ΔW`` of each cross-attention K/V (at the LoRA's weight),
    and ComfyUI patches (``{model key: adapter}``) for the text encoders and for the rest of the UNet."""

    kv: dict[Key, Delta] = field(default_factory=dict)
    text: dict[Any, Any] = field(default_factory=dict)
    unet: dict[Any, Any] = field(default_factory=dict)


def _base_weight(model: Any, key: str) -> torch.Tensor:
    backup = model.backup.get(key)
    weight = backup.weight if backup is not None else model.model.get_parameter(key)
    return weight.detach().float().cpu()


def _delta(model: Any, key: str, patch: Any, strength: float) -> Delta:
    """A ComfyUI patch as ``ΔW`` at ``strength``: a plain LoRA stays low-rank; other types (LoHa, LoKr, DoRA, …) are
    merged into the base weight by ComfyUI's own ``calculate_weight``."""
    if isinstance(patch, LoRAAdapter) and all(part is None for part in patch.weights[3:]):
        up, down, alpha = patch.weights[:3]
        rank = down.shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        return LowRank(down.float().reshape(rank, -1), up.float().reshape(up.shape[0], rank), scale * strength)
    base = _base_weight(model, key)
    return Dense(comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], base.clone(), key) - base)


def lora_parts(model: Any, clip: Any, tensors: Mapping[str, torch.Tensor], strength: float) -> LoraParts:
    """Map a LoRA with ComfyUI's key maps and adapters (comfy/sd.py 72-80: ``load_lora_for_models``'s first half)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(tensors)), key_map)
    parts = LoraParts()
    for key, patch in patches.items():
        name = key if isinstance(key, str) else key[0]
        match = _UNET_KV.match(name)
        if match:
            parts.kv[(match["layer"], match["proj"])] = _delta(model, name, patch, strength)
        elif name.startswith("diffusion_model."):
            parts.unet[key] = patch
        else:
            parts.text[key] = patch
    return parts


def _tensors(path: str) -> Mapping[str, torch.Tensor]:
    return flatten(load_tensors(path))


@dataclass
class ComfySources:
    """``SourceResolver`` for one concept on a ComfyUI CLIP and MODEL; a LoRA in the "full" scope leaves its UNet
    part (but the cross-attention K/V) in ``unet_patches`` for AlignIT's MODEL clone; ``warnings`` for the user."""

    encoder: ComfyEncoder
    model: Any
    lora_scope: str = "kv"
    unet_patches: list[tuple[dict, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def _path(self, folder: str, concept: Concept, spec: SourceSpec) -> str:
        path = folder_paths.get_full_path(folder, spec.name)
        if path is None:
            raise ConceptError(f"concept '{concept.trigger}': no file '{spec.name}' in ComfyUI's {folder} folder")
        return path

    def embedding(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        tree = read_cached(load_tensors, self._path("embeddings", concept, spec))
        handle = {}
        for stream, tokenizer in self.encoder.streams.items():
            try:
                vectors = embedding_vectors(tree, tokenizer.embedding_key)
            except ConceptError as error:
                raise ConceptError(f"embedding '{spec.name}': {error}") from error
            if vectors.shape[-1] != tokenizer.embedding_size:
                raise ConceptError(
                    f"embedding '{spec.name}' holds {vectors.shape[-1]}-wide vectors where this model's "
                    f"{tokenizer.embedding_key} needs {tokenizer.embedding_size}: it was made for another model family"
                )
            handle[stream] = vectors
        if len({len(vectors) for vectors in handle.values()}) != 1:
            raise ConceptError(f"embedding '{spec.name}' holds different vector counts for its text encoders")
        return ConceptSource.embedding(spec.name, len(next(iter(handle.values()))), handle)

    def lora(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        tensors = read_cached(_tensors, self._path("loras", concept, spec))
        try:
            refuse_ia3(tensors, "ComfyUI's LoRA loader")
        except ConceptError as error:
            raise ConceptError(f"LoRA '{spec.name}': {error}") from None
        parts = lora_parts(self.model, self.encoder.clip, tensors, spec.weight)
        try:  # what AlignIT's own reader finds, which knows key schemes ComfyUI 0.8.0 does not (diffusers' "unet.…")
            held = len(parse_lora(spec.name, tensors).kv)
        except ConceptError:
            held = 0
        if held > len(parts.kv):
            self.warnings.append(
                f"LoRA '{spec.name}': ComfyUI's key maps match {len(parts.kv)} of its {held} cross-attention K/V parts; "
                "the others are left out, as Load LoRA leaves them out"
            )
        if not parts.kv and not parts.text:
            raise ConceptError(
                f"LoRA '{spec.name}' has no cross-attention K/V or text-encoder part that ComfyUI maps onto this model: "
                "AlignIT cannot confine it to the concept"
            )
        check_fits(f"LoRA '{spec.name}'", parts.kv, attn2_modules(unet(self.model)))
        text_patch = None
        if parts.text:
            clip = self.encoder.clip.clone()
            clip.add_patches(parts.text, spec.weight)
            text_patch = functools.partial(self.encoder.using, clip)
        if self.lora_scope == "full" and parts.unet:
            self.unet_patches.append((parts.unet, spec.weight))
        tokens, fixes = concept_tokens(self.encoder, concept.trigger, {})
        return ConceptSource(f"lora:{spec.name}", tokens, fixes, text_patch=text_patch, kv=parts.kv)

    def custom_diffusion(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        delta: CustomDiffusionDelta = read_cached(load_custom_diffusion, self._path(CD_FOLDER, concept, spec))
        check_fits(f"Custom Diffusion delta '{spec.name}'", delta.kv, attn2_modules(unet(self.model)))
        width = next(iter(self.encoder.widths.values()))
        for token, vectors in delta.modifier_tokens.items():
            if vectors.shape[-1] != width:
                raise ConceptError(
                    f"'{spec.name}': modifier token {token} is {vectors.shape[-1]} wide, this text encoder's {width}"
                )
        tokens, fixes = concept_tokens(self.encoder, concept.trigger, delta.modifier_tokens)
        return ConceptSource(f"cd:{spec.name}", tokens, fixes, kv=delta.kv)
