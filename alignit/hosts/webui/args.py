"""The script's arguments, in the order of its UI, and how they are written to and read from infotext.

API callers pass ``"alwayson_scripts": {"AlignIT": {"args": [...]}}`` either positionally (the UI order:
``enabled, step_start, step_end, placeholder, lora_scope``, then per concept row ``trigger, class word, source,
strength``, then ``maps, maps_compare, maps_words``) or as one dict:
``{"enabled": true, "concepts": [["<sks>", "cat", "my-cat", 1.0]], "step_end": 0.8, "maps": true}``.
A source is an embedding's name, ``lora:NAME[:WEIGHT]`` or ``cd:NAME``.

Infotext, one readable field per concept that was applied, as other extensions write theirs::

    AlignIT 1: "<sks> → cat, source: my-cat, strength: 0.8", AlignIT steps: 0-0.6, AlignIT maps: "compare, words: cat, racket"

(``AlignIT: "[[…]]"``, the JSON list written by AlignIT 0.1, is still read.)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ...concepts import Concept, Options
from ...errors import ConceptError
from ...infotext import ARROW, KEY_PLACEHOLDER, KEY_SCOPE, KEY_STEPS

log = logging.getLogger("alignit")

ROWS = 3
"""Concept rows in the UI."""

SCALARS = ("enabled", "step_start", "step_end", "placeholder", "lora_scope")
DEFAULTS: dict[str, Any] = {"enabled": False, "step_start": 0.0, "step_end": 1.0, "placeholder": "*", "lora_scope": "kv"}
ROW_FIELDS = ("trigger", "class_word", "source", "strength")
ROW_DEFAULTS: tuple[Any, ...] = ("", "", "", 1.0)
MAP_FIELDS = ("maps", "maps_compare", "maps_words")
MAP_DEFAULTS: tuple[Any, ...] = (False, False, "")
MAPS_AT = len(SCALARS) + len(ROW_FIELDS) * ROWS
ARG_COUNT = MAPS_AT + len(MAP_FIELDS)

PASTE_KEY = "AlignIT paste {}"
"""Where a paste leaves each UI field's value in the WebUI's parsed infotext (read by the fields' ``PasteField``)."""
KEY_LEGACY = "AlignIT"
KEY_MAPS = "AlignIT maps"
_CONCEPT_KEY = re.compile(r"^AlignIT (\d+)$")
_MAPS_TEXT = re.compile(r"^(?P<mode>on|compare)(?:, words: (?P<words>.*))?$")
_CONCEPT_TEXT = re.compile(
    rf"^(?P<trigger>.+?){ARROW}(?P<class_word>.+?)(?:, source: (?P<source>.+?))?(?:, strength: (?P<strength>[-+\d.eE]+))?$"
)


@dataclass(frozen=True)
class MapSettings:
    """The attention-maps option: on, with AlignIT off beside it ("compare"), and the words named (empty: defaults)."""

    on: bool = False
    compare: bool = False
    words: str = ""


def _flag(value: Any, name: str = "enabled") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConceptError(f"'{name}' must be true or false, not {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConceptError(f"'{name}' must be a number, not {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ConceptError(f"'{name}' must be a number, not {value!r}") from None


def _concept(index: int, row: Any) -> Concept | None:
    if isinstance(row, Mapping):
        unknown = set(row) - set(ROW_FIELDS)
        if unknown:
            raise ConceptError(f"concept {index}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        row = [row.get(name) for name in ROW_FIELDS]
    if not isinstance(row, (list, tuple)) or len(row) > len(ROW_FIELDS):
        raise ConceptError(f"concept {index} must be a list [trigger, class word, source, strength] or a dict, not {row!r}")
    cells = [default if cell is None else cell for cell, default in zip([*row, *ROW_DEFAULTS[len(row) :]], ROW_DEFAULTS)]
    if any(not isinstance(cell, str) for cell in cells[:3]):
        raise ConceptError(f"concept {index}: trigger, class word and source must be text, not {row!r}")
    if not any(cell.strip() for cell in cells[:3]):
        return None
    return Concept(cells[0], cells[1], cells[2], _number(f"concept {index} strength", cells[3]))


def parse_args(args: Sequence[Any]) -> tuple[bool, Options]:
    """Read the script's arguments (positional UI order, or a dict first) into (enabled, options); ConceptError says
    in one line what is wrong with them.

    The API fills the arguments a request leaves out with the UI's defaults, so a dict may be followed by them.
    """
    if args and isinstance(args[0], Mapping):
        given = args[0]
        unknown = set(given) - {*SCALARS, "concepts", *MAP_FIELDS}
        if unknown:
            raise ConceptError(f"unknown AlignIT argument(s) {', '.join(sorted(map(str, unknown)))}")
        values = {key: given.get(key, DEFAULTS[key]) for key in SCALARS}
        rows = given.get("concepts") or []
        if not isinstance(rows, (list, tuple)):
            raise ConceptError(f"'concepts' must be a list of concepts, not {rows!r}")
    else:
        if len(args) > ARG_COUNT:
            raise ConceptError(f"AlignIT takes at most {ARG_COUNT} arguments, got {len(args)}")
        padded = [*args, *[None] * (ARG_COUNT - len(args))]
        values = {key: DEFAULTS[key] if value is None else value for key, value in zip(SCALARS, padded)}
        width = len(ROW_FIELDS)
        rows = [padded[i : i + width] for i in range(len(SCALARS), MAPS_AT, width)]
    concepts = tuple(concept for index, row in enumerate(rows, 1) if (concept := _concept(index, row)) is not None)
    for key in ("placeholder", "lora_scope"):
        if not isinstance(values[key], str):
            raise ConceptError(f"'{key}' must be text, not {values[key]!r}")
    options = Options(
        _number("step_start", values["step_start"]),
        _number("step_end", values["step_end"]),
        values["placeholder"],
        concepts,
        values["lora_scope"],
    )
    return _flag(values["enabled"]), options


def parse_maps(args: Sequence[Any]) -> MapSettings:
    """The attention-maps settings of the script's arguments (positional after the concept rows, or the dict's
    ``maps``, ``maps_compare``, ``maps_words``); ConceptError in one line when they cannot be read."""
    if args and isinstance(args[0], Mapping):
        values = [args[0].get(key, default) for key, default in zip(MAP_FIELDS, MAP_DEFAULTS)]
    else:
        given = list(args[MAPS_AT:ARG_COUNT])
        values = [
            default if value is None else value for value, default in zip([*given, *MAP_DEFAULTS[len(given) :]], MAP_DEFAULTS)
        ]
    on, compare, words = values
    if not isinstance(words, str):
        raise ConceptError(f"'maps_words' must be text, not {words!r}")
    return MapSettings(_flag(on, "maps"), _flag(compare, "maps_compare"), words.strip())


def maps_infotext(settings: MapSettings) -> dict[str, str]:
    """The maps' infotext entry: only when they are on."""
    if not settings.on:
        return {}
    text = "compare" if settings.compare else "on"
    return {KEY_MAPS: f"{text}, words: {settings.words}" if settings.words else text}


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


def _read_concept(key: str, text: Any) -> list[Any]:
    match = _CONCEPT_TEXT.match(str(text))
    if match is None:
        raise ConceptError(f"'{key}: {text}' is not 'TRIGGER{ARROW}CLASS WORD[, source: …][, strength: …]'")
    strength = _number(f"{key} strength", match["strength"]) if match["strength"] else 1.0
    return [match["trigger"], match["class_word"], match["source"] or "", strength]


def _legacy_rows(text: Any) -> list[list[Any]]:
    try:
        rows = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise ConceptError(f"'{KEY_LEGACY}: {text}' is not a list of concepts") from None
    if not isinstance(rows, list) or not all(isinstance(row, list) and 2 <= len(row) <= 4 for row in rows):
        raise ConceptError(f"'{KEY_LEGACY}: {text}' is not a list of [trigger, class word, source, strength]")
    return rows


def from_infotext(params: Mapping[str, Any]) -> list[Any]:
    """The script's positional arguments for pasted infotext (AlignIT off when the infotext has no concept);
    ConceptError in one line when its AlignIT fields cannot be read."""
    numbered = sorted((int(m[1]), key) for key in params if (m := _CONCEPT_KEY.match(str(key))))
    rows = [_read_concept(key, params[key]) for _, key in numbered]
    if KEY_LEGACY in params:
        rows += _legacy_rows(params[KEY_LEGACY])
    cells: list[Any] = []
    for row in rows[:ROWS]:
        cells += [*row, *ROW_DEFAULTS[len(row) :]]
    cells += [cell for _ in range(ROWS - min(len(rows), ROWS)) for cell in ROW_DEFAULTS]
    start, dash, end = str(params.get(KEY_STEPS, "0-1")).partition("-")
    if not dash:
        raise ConceptError(f"'{KEY_STEPS}: {params[KEY_STEPS]}' is not FROM-TO")
    placeholder, scope = str(params.get(KEY_PLACEHOLDER, "*")), str(params.get(KEY_SCOPE, "kv"))
    maps = [*MAP_DEFAULTS]
    if KEY_MAPS in params:
        match = _MAPS_TEXT.match(str(params[KEY_MAPS]).strip())
        if match is None:
            raise ConceptError(f"'{KEY_MAPS}: {params[KEY_MAPS]}' is not 'on' or 'compare'[, words: …]")
        maps = [True, match["mode"] == "compare", match["words"] or ""]
    arguments = [bool(rows), _number(KEY_STEPS, start), _number(KEY_STEPS, end), placeholder, scope, *cells, *maps]
    _, options = parse_args(arguments)  # what cannot be used is refused here, not at generation time
    options.validated()
    for concept in options.concepts:
        concept.validated()
    return arguments


def paste(params: dict[str, Any]) -> None:
    """The WebUI's ``on_infotext_pasted`` callback: read AlignIT's fields once and leave each UI field's value under
    ``PASTE_KEY``; when they cannot be read, leave none (the fields keep their values) and say why in the console."""
    try:
        values = from_infotext(params)
    except ConceptError as error:
        log.warning("AlignIT: the pasted infotext's AlignIT fields are not applied: %s", " ".join(str(error).split()))
        return
    params.update({PASTE_KEY.format(i): value for i, value in enumerate(values)})
