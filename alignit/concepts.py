"""What a concept is: its trigger, its class word, where its customization comes from, and the run options."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from .errors import ConceptError

_FORBIDDEN_CLASS_CHARS = re.compile(r"[()\[\]:|<>\\{}]")
_RESERVED_WORDS = re.compile(r"\b(AND|BREAK)\b")


def plain_words(text: str) -> bool:
    """Whether ``text`` can stand as a class word: no prompt syntax (brackets, colons, '|', '<', '>'), not AND/BREAK."""
    return not (_FORBIDDEN_CLASS_CHARS.search(text) or _RESERVED_WORDS.search(text))


@dataclass(frozen=True)
class Concept:
    """One customized concept in a prompt.

    trigger: the text the user writes (an embedding's own name or a placeholder such as ``<sks>``).
    class_word: the plain word(s) the base model conditions on in its place (``cat``).
    source: the name of the embedding that carries the concept; empty means the trigger itself.
    strength: 1 takes the concept rows as they are, 0 keeps the class word's rows, in between blends (up to 2).
    """

    trigger: str
    class_word: str
    source: str = ""
    strength: float = 1.0

    @property
    def source_name(self) -> str:
        return self.source.strip() or self.trigger.strip()

    def validated(self) -> Concept:
        """Return a stripped copy, or raise ConceptError saying what is wrong."""
        trigger, class_word, source = self.trigger.strip(), " ".join(self.class_word.split()), self.source.strip()
        if not trigger:
            raise ConceptError("a concept row has a class word but no trigger")
        if not class_word:
            raise ConceptError(f"concept '{trigger}': the class word is empty")
        if not plain_words(class_word):
            raise ConceptError(
                f"concept '{trigger}': the class word '{class_word}' must be plain words "
                "(no brackets, colons, '|', '<', '>' and not AND/BREAK)"
            )
        if trigger.lower() == class_word.lower():
            raise ConceptError(f"concept '{trigger}': the class word must differ from the trigger")
        if not 0.0 <= self.strength <= 2.0:
            raise ConceptError(f"concept '{trigger}': strength must lie in [0, 2] (got {self.strength})")
        return Concept(trigger, class_word, source, float(self.strength))


LORA_SCOPES = ("kv", "full")


class SourceKind(enum.Enum):
    """What carries a concept: an embedding's vectors, a LoRA's factors or a Custom Diffusion delta."""

    EMBEDDING = "embedding"
    LORA = "lora"
    CUSTOM_DIFFUSION = "cd"


@dataclass(frozen=True)
class SourceSpec:
    """Where a concept comes from; ``weight`` is the LoRA multiplier (``lora:name:0.8``)."""

    kind: SourceKind
    name: str
    weight: float = 1.0


def parse_source(concept: Concept) -> SourceSpec:
    """``lora:NAME[:WEIGHT]``, ``cd:NAME``, or an embedding's name (empty: the trigger's own name)."""
    text = concept.source_name
    kind, _, rest = text.partition(":")
    if kind.lower() == "lora" and rest:
        name, _, weight = rest.rpartition(":") if rest.count(":") else (rest, "", "")
        try:
            return SourceSpec(SourceKind.LORA, name.strip(), float(weight) if weight.strip() else 1.0)
        except ValueError:
            return SourceSpec(SourceKind.LORA, rest.strip())
    if kind.lower() == "cd" and rest:
        return SourceSpec(SourceKind.CUSTOM_DIFFUSION, rest.strip())
    return SourceSpec(SourceKind.EMBEDDING, text)


@dataclass(frozen=True)
class Options:
    """Per-generation settings.

    step_start/step_end: the fraction of sampling steps during which the concept rows are used.
    placeholder: the neutral word that stands for every other token of the dummy prompt p'.
    lora_scope: "kv" (the UNet runs its base weights; a concept's LoRA acts only through the concept's keys and
    values) or "full" (the WebUI applies the LoRA to the whole UNet; AlignIT gives every other token base keys/values).
    """

    step_start: float = 0.0
    step_end: float = 1.0
    placeholder: str = "*"
    concepts: tuple[Concept, ...] = field(default_factory=tuple)
    lora_scope: str = "kv"

    def validated(self) -> Options:
        if not 0.0 <= self.step_start < self.step_end <= 1.0:
            raise ConceptError(f"the step range must satisfy 0 <= start < end <= 1 (got {self.step_start}, {self.step_end})")
        if not self.placeholder.strip():
            raise ConceptError("the placeholder word is empty")
        if self.lora_scope not in LORA_SCOPES:
            raise ConceptError(f"the LoRA scope must be one of {LORA_SCOPES} (got {self.lora_scope!r})")
        return self
