"""The script's arguments, in the order of its UI, and how they are written to and read from infotext.

API callers pass ``"alwayson_scripts": {"AlignIT": {"args": [...]}}`` either positionally (the UI order:
``enabled, step_start, step_end, placeholder, lora_scope``, then per concept row ``trigger, class word, source,
strength``) or as one dict: ``{"enabled": true, "concepts": [["<sks>", "cat", "my-cat", 1.0]], "step_end": 0.8}``.
A source is an embedding's name, ``lora:NAME[:WEIGHT]`` or ``cd:NAME``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ...concepts import Concept, Options
from ...errors import ConceptError

ROWS = 3
"""Concept rows in the UI."""

SCALARS = ("enabled", "step_start", "step_end", "placeholder", "lora_scope")
DEFAULTS: dict[str, Any] = {"enabled": False, "step_start": 0.0, "step_end": 1.0, "placeholder": "*", "lora_scope": "kv"}
ROW_FIELDS = ("trigger", "class_word", "source", "strength")
ROW_DEFAULTS: tuple[Any, ...] = ("", "", "", 1.0)
ARG_COUNT = len(SCALARS) + len(ROW_FIELDS) * ROWS

KEY_CONCEPTS = "AlignIT"
KEY_STEPS = "AlignIT steps"
KEY_PLACEHOLDER = "AlignIT placeholder"
KEY_SCOPE = "AlignIT LoRA scope"


def _concept(row: Any) -> Concept | None:
    if isinstance(row, Mapping):
        row = [row.get(name) for name in ROW_FIELDS]
    cells = [default if cell is None else cell for cell, default in zip([*row, *ROW_DEFAULTS[len(row) :]], ROW_DEFAULTS)]
    if not any(str(cell).strip() for cell in cells[:3]):
        return None
    return Concept(str(cells[0]), str(cells[1]), str(cells[2]), float(cells[3]))


def parse_args(args: Sequence[Any]) -> tuple[bool, Options]:
    """Read the script's arguments (positional UI order, or a dict first) into (enabled, options).

    The API fills the arguments a request leaves out with the UI's defaults, so a dict may be followed by them.
    """
    try:
        if args and isinstance(args[0], Mapping):
            values = {key: args[0].get(key, DEFAULTS[key]) for key in SCALARS}
            rows = list(args[0].get("concepts") or [])
        else:
            padded = [*args, *[None] * (ARG_COUNT - len(args))]
            values = {key: DEFAULTS[key] if value is None else value for key, value in zip(SCALARS, padded)}
            width = len(ROW_FIELDS)
            rows = [padded[i : i + width] for i in range(len(SCALARS), ARG_COUNT, width)]
        concepts = tuple(concept for concept in map(_concept, rows) if concept is not None)
        options = Options(
            float(values["step_start"]),
            float(values["step_end"]),
            str(values["placeholder"]),
            concepts,
            str(values["lora_scope"]),
        )
    except (TypeError, ValueError) as error:
        raise ConceptError(f"bad AlignIT arguments: {error}") from error
    return bool(values["enabled"]), options


def with_overrides(enabled: bool, options: Options, overrides: Mapping[str, Any]) -> tuple[bool, Options]:
    """Apply X/Y/Z plot overrides: enabled, step_start, step_end, strength (every concept), class_word (the first)."""
    enabled = bool(overrides.get("enabled", enabled))
    changes: dict[str, Any] = {key: float(overrides[key]) for key in ("step_start", "step_end") if key in overrides}
    concepts = options.concepts
    if "strength" in overrides:
        concepts = tuple(replace(concept, strength=float(overrides["strength"])) for concept in concepts)
    if "class_word" in overrides and concepts:
        concepts = (replace(concepts[0], class_word=str(overrides["class_word"])), *concepts[1:])
    return enabled, replace(options, concepts=concepts, **changes)


def to_infotext(options: Options) -> dict[str, str]:
    """Infotext entries for a generation that used AlignIT."""
    rows = [[c.trigger, c.class_word, c.source] + ([c.strength] if c.strength != 1.0 else []) for c in options.concepts]
    params = {KEY_CONCEPTS: json.dumps(rows, ensure_ascii=False)}
    if (options.step_start, options.step_end) != (0.0, 1.0):
        params[KEY_STEPS] = f"{options.step_start:g}-{options.step_end:g}"
    if options.placeholder != "*":
        params[KEY_PLACEHOLDER] = options.placeholder
    if options.lora_scope != "kv":
        params[KEY_SCOPE] = options.lora_scope
    return params


def from_infotext(params: Mapping[str, Any]) -> list[Any]:
    """The script's positional arguments for pasted infotext (AlignIT off when the infotext has none)."""
    cells: list[Any] = []
    try:
        rows = json.loads(params[KEY_CONCEPTS]) if KEY_CONCEPTS in params else []
    except (TypeError, ValueError):
        rows = []
    for row in rows[:ROWS]:
        cells += [*row, *ROW_DEFAULTS[len(row) :]][: len(ROW_FIELDS)]
    while len(cells) < len(ROW_FIELDS) * ROWS:
        cells += ROW_DEFAULTS
    start, _, end = str(params.get(KEY_STEPS, "0-1")).partition("-")
    placeholder, scope = str(params.get(KEY_PLACEHOLDER, "*")), str(params.get(KEY_SCOPE, "kv"))
    return [KEY_CONCEPTS in params, float(start or 0.0), float(end or 1.0), placeholder, scope, *cells]
