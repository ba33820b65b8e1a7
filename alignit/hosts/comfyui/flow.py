"""One run of AlignIT Text Encode: the class-word prompt p encoded as CLIP Text Encode encodes it, each concept's
rows spliced in, and a MODEL clone carrying the weight-side concepts' keys and values.

Bad input never stops the workflow: a concept that cannot be used (no such file, a file AlignIT refuses to read, its
trigger not in the text, made for another model) is left out with a message, and when nothing is left, or the
prompt cannot be laid out as ComfyUI lays it out, or the model is of another family, the node returns exactly what
CLIP Text Encode returns for the text as written and the input MODEL. Each message is one line in the console and
on the node. Nothing touches the input CLIP or MODEL: LoRA text parts go to a CLIP clone used for p' only, patches
to AlignIT's MODEL clone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ...concepts import LORA_SCOPES, Concept, Options
from ...engine import ConceptSource, Splicer, resolve_source
from ...errors import ConceptError, LayoutMismatch, Unsupported
from ...kv import KVRewriter
from ...kv_hooks import attn2_modules, module_projection
from ...layout import Chunk
from ...prompt import rewrite_prompt
from .attention import AttentionPatch
from .encoder import ComfyEncoder, sd_streams, unet
from .sources import ComfySources, core_source

log = logging.getLogger("alignit")

Conditioning = list[list[Any]]  # ComfyUI's CONDITIONING: [[cond (1, 77k, C), {"pooled_output": …, …}], …]


@dataclass(frozen=True)
class ConceptInput:
    """What an AlignIT Concept node passes on: the user's fields, unresolved."""

    trigger: str
    class_word: str
    source: str  # a file as ``folder/name`` (``sources.source_choices``)
    strength: float = 1.0
    lora_weight: float = 1.0
    lora_scope: str = "kv"


@dataclass
class Result:
    conditioning: Conditioning
    model: Any
    messages: list[str] = field(default_factory=list)


class ComfySplicer(Splicer):
    """The core's splicer, with prompts laid out as ComfyUI's own tokenizer lays them out."""

    def layout(self, marked_text: str) -> list[Chunk]:
        assert isinstance(self.encoder, ComfyEncoder)
        return self.encoder.lay_out(marked_text)


def with_step_range(aligned: Conditioning, plain: Conditioning, start: float, end: float) -> Conditioning:
    """AlignIT's entries for ``[start, end]`` of the sampling schedule and p's own outside it, as
    ConditioningSetTimestepRange writes ranges (``start_percent``/``end_percent``, comfy/samplers.py 620-643)."""
    if start <= 0.0 and end >= 1.0:
        return aligned
    out = [[cond, {**extra, "start_percent": start, "end_percent": end}] for cond, extra in aligned]
    if start > 0.0:
        out += [[cond, {**extra, "start_percent": 0.0, "end_percent": start}] for cond, extra in plain]
    if end < 1.0:
        out += [[cond, {**extra, "start_percent": end, "end_percent": 1.0}] for cond, extra in plain]
    return out


def patched_model(model: Any, splicer: Splicer, unet_patches: Sequence[tuple[dict, float]]) -> Any:
    """The input MODEL, or a clone with the "full"-scope LoRA patches and AlignIT's K/V patches."""
    chunks = splicer.kv_chunks()
    if not chunks and not unet_patches:
        return model
    clone = model.clone()
    for patches, weight in unet_patches:
        clone.add_patches(patches, weight)
    if chunks:
        rewriter = KVRewriter(chunks, splicer.kv_weights(), (), module_projection(attn2_modules(unet(clone))))
        AttentionPatch(rewriter).install(clone)
    return clone


class _Run:
    """One run's messages, its concepts, and what it falls back to."""

    def __init__(self, clip: Any, model: Any, text: str):
        self.clip, self.model, self.text = clip, model, text
        self.messages: list[str] = []

    def say(self, message: str) -> None:
        message = " ".join(str(message).split())
        log.warning("AlignIT: %s", message)
        if message not in self.messages:
            self.messages.append(message)

    def plain(self) -> Result:
        """What CLIP Text Encode gives for the text as written, and the input MODEL (nodes.py 73-77)."""
        return Result(self.clip.encode_from_tokens_scheduled(self.clip.tokenize(self.text)), self.model, self.messages)

    def concepts(self, inputs: Sequence[ConceptInput]) -> list[tuple[Concept, ConceptInput]]:
        """The concepts that are well formed and whose trigger is in the text."""
        valid = []
        for item in inputs:
            try:
                if item.lora_scope not in LORA_SCOPES:
                    raise ConceptError(f"concept '{item.trigger}': the LoRA scope must be one of {LORA_SCOPES}")
                source = core_source(item.source, item.lora_weight)
                valid.append((Concept(item.trigger, item.class_word, source, item.strength).validated(), item))
            except ConceptError as error:
                self.say(f"{error}; this concept is left out")
        found = rewrite_prompt(self.text, [concept for concept, _ in valid]).found
        for (concept, _), count in zip(valid, found):
            if not count:
                self.say(f"concept '{concept.trigger}': its trigger is not in the text; this concept is left out")
        return [pair for pair, count in zip(valid, found) if count]

    def resolve(
        self, encoder: ComfyEncoder, pairs: list[tuple[Concept, ConceptInput]]
    ) -> tuple[list[Concept], list[ConceptSource], list[tuple[dict, float]]]:
        """The concepts whose sources resolve, their sources, and the "full"-scope LoRA patches for the MODEL clone."""
        concepts: list[Concept] = []
        sources: list[ConceptSource] = []
        unet_patches: list[tuple[dict, float]] = []
        for concept, item in pairs:
            resolver = ComfySources(encoder, self.model, item.lora_scope)
            try:
                sources.append(resolve_source(concept, resolver))
                for message in resolver.warnings:
                    self.say(message)
            except (ConceptError, Unsupported) as error:
                self.say(f"{error}; this concept is left out")
                continue
            except Exception as error:  # a bug or a ComfyUI change must cost the concept, not the workflow
                log.exception("AlignIT: resolving concept %r", concept.trigger)
                self.say(f"concept '{concept.trigger}': {type(error).__name__}: {error}; this concept is left out")
                continue
            concepts.append(concept)
            unet_patches += resolver.unet_patches
        return concepts, sources, unet_patches


def align(
    clip: Any, model: Any, text: str, inputs: Sequence[ConceptInput], start: float = 0.0, end: float = 1.0, placeholder: str = "*"
) -> Result:
    """AlignIT Text Encode: CONDITIONING for ``text`` with the concepts' rows, and the MODEL for them."""
    run = _Run(clip, model, text)
    try:
        options = Options(start, end, placeholder).validated()
        encoder = ComfyEncoder(clip, sd_streams(clip))
        unet(model)
    except (ConceptError, Unsupported) as error:
        run.say(f"{error}; encoding without AlignIT")
        return run.plain()
    concepts, sources, unet_patches = run.resolve(encoder, run.concepts(inputs))
    if not concepts:
        run.say("no usable concept; encoding without AlignIT")
        return run.plain()
    splicer = ComfySplicer(encoder, sources, replace(options, concepts=tuple(concepts)))
    rewrite = rewrite_prompt(text, concepts)
    try:
        _ = splicer.placeholder_id
        splicer.prepare(rewrite.marked)
        tokens = encoder.plain_tokens(rewrite.plain)  # the word ids dropped, as clip.tokenize drops them
        plain = clip.encode_from_tokens_scheduled(
            {name: [[(t, w) for t, w, _ in c] for c in chunks] for name, chunks in tokens.items()}
        )
        aligned = [[splicer.splice(rewrite.marked, cond[0])[None], dict(extra)] for cond, extra in plain]
    except Exception as error:  # ConceptError, LayoutMismatch, or a bug: the text goes to ComfyUI as it is
        if not isinstance(error, (ConceptError, LayoutMismatch)):
            log.exception("AlignIT: encoding %r", text)
        run.say(f"{error}; encoding without AlignIT")
        return run.plain()
    for message in splicer.warnings:
        run.say(message)
    try:
        model_out = patched_model(model, splicer, unet_patches)
    except Exception as error:  # the splice stands; the concepts' own K/V weights are left out
        log.exception("AlignIT: patching the MODEL")
        run.say(f"{type(error).__name__}: {error}; the concepts' own key/value weights are not applied")
        model_out = model
    return Result(with_step_range(aligned, plain, options.step_start, options.step_end), model_out, run.messages)
