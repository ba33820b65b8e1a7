"""How AlignIT's settings read in an image's infotext (the WebUIs' generation parameters, the PNGs of
``alignit generate``): one readable field per concept that was applied, as other extensions write theirs::

    AlignIT 1: "<sks> → cat, source: my-cat, strength: 0.8", AlignIT steps: 0-0.6
"""

from __future__ import annotations

from collections.abc import Sequence

from .concepts import Concept, Options

KEY_STEPS = "AlignIT steps"
KEY_PLACEHOLDER = "AlignIT placeholder"
KEY_SCOPE = "AlignIT LoRA scope"
ARROW = " → "


def describe(concept: Concept) -> str:
    """A concept as its infotext field reads: ``<sks> → cat, source: my-cat, strength: 0.8``."""
    text = f"{concept.trigger}{ARROW}{concept.class_word}"
    if concept.source:
        text += f", source: {concept.source}"
    if concept.strength != 1.0:
        text += f", strength: {concept.strength:g}"
    return text


def to_infotext(options: Options, applied: Sequence[Concept]) -> dict[str, str]:
    """Infotext entries for a generation in which the ``applied`` concepts were used."""
    params = {f"AlignIT {i}": describe(concept) for i, concept in enumerate(applied, 1)}
    if (options.step_start, options.step_end) != (0.0, 1.0):
        params[KEY_STEPS] = f"{options.step_start:g}-{options.step_end:g}"
    if options.placeholder != "*":
        params[KEY_PLACEHOLDER] = options.placeholder
    if options.lora_scope != "kv":
        params[KEY_SCOPE] = options.lora_scope
    return params
