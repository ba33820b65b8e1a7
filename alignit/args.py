"""The script's arguments, in the order of its UI, and how they are written to and read from infotext.

API callers pass ``"alwayson_scripts": {"AlignIT": {"args": [...]}}`` either positionally (the UI order below)
or as one dict: ``{"enabled": true, "concepts": [["<sks>", "cat", "my-cat"]], "strength": 1.0, ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .concepts import Concept, ConceptError, Options

ROWS = 3
"""Concept rows in the UI (trigger, class word, embedding)."""

SCALARS = ("enabled", "strength", "step_start", "step_end", "placeholder")
DEFAULTS: dict[str, Any] = {"enabled": False, "strength": 1.0, "step_start": 0.0, "step_end": 1.0, "placeholder": "*"}
ARG_COUNT = len(SCALARS) + 3 * ROWS

KEY_CONCEPTS = "AlignIT"
KEY_STRENGTH = "AlignIT strength"
KEY_STEPS = "AlignIT steps"
KEY_PLACEHOLDER = "AlignIT placeholder"


def _concept_rows(rows: Any) -> list[Concept]:
    concepts = []
    for row in rows or []:
        if isinstance(row, Mapping):
            row = [row.get("trigger", ""), row.get("class_word", ""), row.get("source", "")]
        cells = [str(x or "") for x in list(row) + ["", "", ""]][:3]
        if any(cell.strip() for cell in cells):
            concepts.append(Concept(*cells))
    return concepts


def parse_args(args: Sequence[Any]) -> tuple[bool, Options]:
    """Read the script's arguments (positional UI order, or a single dict) into (enabled, options)."""
    if len(args) == 1 and isinstance(args[0], Mapping):
        given = dict(args[0])
        values = {key: given.get(key, DEFAULTS[key]) for key in SCALARS}
        concepts = _concept_rows(given.get("concepts"))
    else:
        padded = list(args) + [None] * (ARG_COUNT - len(args))
        values = {key: DEFAULTS[key] if value is None else value for key, value in zip(SCALARS, padded)}
        rest = padded[len(SCALARS) : ARG_COUNT]
        concepts = _concept_rows(rest[i : i + 3] for i in range(0, 3 * ROWS, 3))
    try:
        options = Options(
            strength=float(values["strength"]),
            step_start=float(values["step_start"]),
            step_end=float(values["step_end"]),
            placeholder=str(values["placeholder"]),
            concepts=tuple(concepts),
        )
    except (TypeError, ValueError) as error:
        raise ConceptError(f"bad AlignIT arguments: {error}") from error
    return bool(values["enabled"]), options


def with_overrides(enabled: bool, options: Options, overrides: Mapping[str, Any]) -> tuple[bool, Options]:
    """Apply X/Y/Z plot overrides (keys: enabled, strength, step_start, step_end, class_word)."""
    enabled = bool(overrides.get("enabled", enabled))
    changes = {key: float(overrides[key]) for key in ("strength", "step_start", "step_end") if key in overrides}
    if "class_word" in overrides and options.concepts:
        first = replace(options.concepts[0], class_word=str(overrides["class_word"]))
        changes["concepts"] = (first, *options.concepts[1:])
    return enabled, replace(options, **changes)


def to_infotext(options: Options) -> dict[str, str]:
    """Infotext entries for a generation that used AlignIT."""
    params = {KEY_CONCEPTS: json.dumps([[c.trigger, c.class_word, c.source] for c in options.concepts], ensure_ascii=False)}
    if options.strength != 1.0:
        params[KEY_STRENGTH] = f"{options.strength:g}"
    if (options.step_start, options.step_end) != (0.0, 1.0):
        params[KEY_STEPS] = f"{options.step_start:g}-{options.step_end:g}"
    if options.placeholder != "*":
        params[KEY_PLACEHOLDER] = options.placeholder
    return params


def from_infotext(params: Mapping[str, Any]) -> list[Any]:
    """The script's positional arguments for pasted infotext (AlignIT off when the infotext has none)."""
    if KEY_CONCEPTS not in params:
        return [False, 1.0, 0.0, 1.0, "*"] + [""] * (3 * ROWS)
    try:
        rows = json.loads(params[KEY_CONCEPTS])
    except (TypeError, ValueError):
        rows = []
    start, _, end = str(params.get(KEY_STEPS, "0-1")).partition("-")
    cells = [str(cell) for row in rows[:ROWS] for cell in (list(row) + ["", "", ""])[:3]]
    return [
        True,
        float(params.get(KEY_STRENGTH, 1.0)),
        float(start or 0.0),
        float(end or 1.0),
        str(params.get(KEY_PLACEHOLDER, "*")),
        *(cells + [""] * (3 * ROWS - len(cells))),
    ]
