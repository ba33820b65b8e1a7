"""Find concept triggers in WebUI prompt syntax and build the class-word prompt p.

Two texts come out of a rewrite:
- ``plain``: the prompt with each trigger replaced by its class word; the WebUI encodes it as it would any prompt.
- ``marked``: the same text with each class word wrapped in private-use characters that name the concept.
  It is never tokenized by the WebUI: AlignIT runs it through the WebUI's own AND / prompt-editing functions
  (which treat the markers as plain text) to learn where each class word landed, then strips the markers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .concepts import Concept

MARK_OPEN = "\ue000"
MARK_CLOSE = "\ue001"
_INDEX_BASE = 0xE100
_MAX_CONCEPTS = 0x100

# Extra-network tags (<lora:name:1>, <hypernet:...>) are the WebUI's, never a trigger site.
EXTRA_NETWORK = re.compile(r"<[^<>:\s]+:[^<>]*>")
_MARKED = re.compile(f"{MARK_OPEN}([{chr(_INDEX_BASE)}-{chr(_INDEX_BASE + _MAX_CONCEPTS - 1)}])(.*?){MARK_CLOSE}", re.S)
_MARKERS = re.compile(f"[{MARK_OPEN}{MARK_CLOSE}{chr(_INDEX_BASE)}-{chr(_INDEX_BASE + _MAX_CONCEPTS - 1)}]")


@dataclass(frozen=True)
class Rewrite:
    """A prompt with its triggers replaced; ``found[i]`` counts the occurrences of concept i."""

    original: str
    plain: str
    marked: str
    found: tuple[int, ...]

    @property
    def has_concepts(self) -> bool:
        return any(self.found)


def _trigger_pattern(trigger: str) -> str:
    body = re.escape(trigger)
    before = r"(?<!\w)" if re.match(r"\w", trigger) else ""
    after = r"(?!\w)" if re.search(r"\w$", trigger) else ""
    return before + body + after


def rewrite_prompt(prompt: str, concepts: Sequence[Concept]) -> Rewrite:
    """Replace every trigger of ``concepts`` in ``prompt`` by its class word (case-insensitive, whole words)."""
    if len(concepts) > _MAX_CONCEPTS:
        raise ValueError(f"at most {_MAX_CONCEPTS} concepts")
    prompt = _MARKERS.sub(" ", prompt)
    found = [0] * len(concepts)
    if not concepts:
        return Rewrite(prompt, prompt, prompt, tuple(found))

    order = sorted(range(len(concepts)), key=lambda i: -len(concepts[i].trigger))
    pattern = re.compile("|".join(f"(?P<c{i}>{_trigger_pattern(concepts[i].trigger)})" for i in order), re.I)
    protected = [m.span() for m in EXTRA_NETWORK.finditer(prompt)]

    plain_parts: list[str] = []
    marked_parts: list[str] = []
    cursor = 0
    for match in pattern.finditer(prompt):
        start, end = match.span()
        if any(a <= start < b for a, b in protected):
            continue
        index = int(next(name for name, value in match.groupdict().items() if value is not None)[1:])
        word = concepts[index].class_word
        # A trigger glued to a word ("my<sks>") must not fuse with it once it is a word itself.
        lead = " " if start > 0 and prompt[start - 1].isalnum() else ""
        trail = " " if end < len(prompt) and prompt[end].isalnum() else ""
        between = prompt[cursor:start]
        plain_parts += [between, lead, word, trail]
        marked_parts += [between, lead, MARK_OPEN, chr(_INDEX_BASE + index), word, MARK_CLOSE, trail]
        found[index] += 1
        cursor = end
    plain_parts.append(prompt[cursor:])
    marked_parts.append(prompt[cursor:])
    return Rewrite(prompt, "".join(plain_parts), "".join(marked_parts), tuple(found))


def strip_markers(text: str) -> str:
    """The plain text of a marked text."""
    return _MARKERS.sub("", text)


def split_marked(text: str) -> list[tuple[str, int | None]]:
    """Split a marked text into pieces: ``(text, None)`` for prompt text, ``(class word, concept index)`` for insertions."""
    pieces: list[tuple[str, int | None]] = []
    cursor = 0
    for match in _MARKED.finditer(text):
        if match.start() > cursor:
            pieces.append((strip_markers(text[cursor : match.start()]), None))
        pieces.append((match.group(2), ord(match.group(1)) - _INDEX_BASE))
        cursor = match.end()
    if cursor < len(text) or not pieces:
        pieces.append((strip_markers(text[cursor:]), None))
    return pieces


def set_lora_tag(prompt: str, name: str, tag: str | None) -> str:
    """Remove every ``<lora:NAME…>`` tag of ``name`` from a prompt; append ``tag`` when given."""
    stripped = re.sub(rf"<lora:{re.escape(name)}(?::[^>]*)?>", "", prompt)
    return stripped if tag is None else f"{stripped} {tag}"
