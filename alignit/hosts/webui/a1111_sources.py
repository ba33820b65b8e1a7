"""A1111: embeddings from the WebUI's embedding database; LoRA files from the Lora extension's list, read by
``alignit.sources.lora``; Custom Diffusion as in ``webui_sources``.

A plain LoRA module stays low-rank. Every other module type of a LyCORIS file (LoHa, LoKr, (IA)³, DoRA, full diffs)
gets its ``ΔW`` from the built-in Lora extension's own network modules (``extensions-builtin/Lora/network_*.py``):
the module type that accepts the parts is created on the layer it names, and its ``calc_updown`` runs on that layer's
weight, as A1111 does when it applies the LoRA itself, for the concept's K/V and text-encoder layers only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from modules import sd_hijack

from ...concepts import Concept, SourceSpec
from ...engine import ConceptSource
from ...errors import ConceptError
from ...kv import Delta, Dense, Key, check_layers
from ...kv_hooks import attn2_modules
from ...sources.files import read_cached
from ...sources.lora import LoraFactors, Parts, load_lora
from ...text_lora import tower_loras
from . import sources as webui_sources


def source_choices() -> list[str]:
    return webui_sources.source_choices(sd_hijack.model_hijack.embedding_db.word_embeddings)


def base_weight(module: torch.nn.Module, slot: str | None = None) -> torch.Tensor:
    """A layer's weight without the networks the Lora extension merged into it (its backup, once it made one); for an
    ``nn.MultiheadAttention`` the q, k or v rows of ``in_proj_weight`` or ``out_proj``'s weight."""
    layer: Any = module
    backup = getattr(layer, "network_weights_backup", None)  # networks.py network_apply_weights
    if slot is None:
        return backup if isinstance(backup, torch.Tensor) else layer.weight
    if slot == "out":
        return backup[1] if isinstance(backup, tuple) else layer.out_proj.weight
    in_proj = backup[0] if isinstance(backup, tuple) else layer.in_proj_weight
    return in_proj.chunk(3, 0)["qkv".index(slot)]


def network_delta(
    lora: str, sd_key: str, parts: Parts, module: torch.nn.Module, weight: torch.Tensor, multiplier: float
) -> tuple[Dense, Any]:
    """``ΔW`` of one LyCORIS module at ``multiplier`` by the Lora extension's maths, and its bias delta (or None)."""
    try:
        import network  # the built-in Lora extension's modules, importable once it has loaded
        import networks
    except ImportError as error:
        raise ConceptError(f"LoRA '{lora}': its {sd_key} needs A1111's built-in Lora extension, which is not loaded") from error
    net = network.Network(lora, None)
    net.te_multiplier = net.unet_multiplier = multiplier
    weights = network.NetworkWeights(network_key=sd_key, sd_key=sd_key, w=dict(parts), sd_module=module)
    made = next((made for kind in networks.module_types if (made := kind.create_module(net, weights)) is not None), None)
    if made is None:
        raise ConceptError(f"LoRA '{lora}': A1111's Lora extension reads no module of the parts {', '.join(parts)} ({sd_key})")
    try:
        with torch.no_grad():
            updown, bias = made.calc_updown(weight.detach())
        return Dense(updown.detach().float().cpu().reshape(weight.shape)), bias
    except RuntimeError as error:
        raise ConceptError(f"LoRA '{lora}' was made for another model: {sd_key}: {' '.join(str(error).split())}") from error


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

    def _formed(self, spec: SourceSpec, sd_key: str, parts: Parts, module: torch.nn.Module, slot: str | None = None) -> Delta:
        delta, bias = network_delta(spec.name, sd_key, parts, module, base_weight(module, slot), spec.weight)
        if bias is not None:
            self.warn(f"LoRA '{spec.name}': the bias part of {sd_key} is not applied to the concept")
        return delta

    def _text(self, spec: SourceSpec, factors: LoraFactors) -> list[dict[str, Delta]]:
        """Each text encoder's part of the LoRA at its weight: te (SDXL: te1) on the first, te2 on SDXL's OpenCLIP-G."""
        towers = self.encoder.towers
        given = [(factors.text, factors.text_parts), (factors.text_2, factors.text_2_parts)]
        if len(towers) < 2 and (factors.text_2 or factors.text_2_parts):
            raise ConceptError(f"LoRA '{spec.name}' has parts for a second text encoder (lora_te2_): it was made for SDXL")
        text = []
        for index, (tower, (low_rank, raw)) in enumerate(zip(towers, given)):
            deltas: dict[str, Delta] = {name: projection.times(spec.weight) for name, projection in low_rank.items()}
            for name, parts in raw.items():
                deltas[name] = self._formed(spec, f"te{index + 1}_{name}", parts, *tower.module(name))
            text.append(deltas)
        return text

    def lora(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        factors: LoraFactors = read_cached(load_lora, webui_sources.lora_file(concept))
        modules = attn2_modules(self.unet)
        kv: dict[Key, Delta] = {key: projection.times(spec.weight) for key, projection in factors.kv.items()}
        check_layers(f"LoRA '{spec.name}'", factors.kv_parts, modules)
        for (layer, proj), parts in factors.kv_parts.items():
            kv[(layer, proj)] = self._formed(spec, f"{layer}.to_{proj}", parts, modules[(layer, proj)])
        text = self._text(spec, factors)
        towers = self.encoder.towers
        text_patch = functools.partial(tower_loras, towers[: len(text)], text) if any(text) else None
        return webui_sources.resolve_lora(concept, self.encoder, modules, kv, text_patch, self.lora_scope)
