"""The WebUI's attention syntax: ``(word)``, ``(word:1.3)``, ``[word]``, escapes and ``BREAK``.

Same grammar and results as the WebUI's ``parse_prompt_attention`` (A1111 ``modules/prompt_parser.py``),
so the layout AlignIT computes matches the one the WebUI encodes.
"""

from __future__ import annotations

import re

BREAK = ("BREAK", -1.0)

_TOKENS = re.compile(
    r"""
    \\[()\[\]\\]?        # escapes; a lone backslash is text
    | \(
    | \[
    | :\s*([+-]?[.\d]+)\s*\)   # closing a weighted group
    | \)
    | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (fragment, weight) pairs; a ``BREAK`` keyword becomes ``("BREAK", -1.0)``."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    for start in round_open:
        scale(start, _ROUND)
    for start in square_open:
        scale(start, _SQUARE)
    if not res:
        res = [["", 1.0]]

    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(text_, weight_) for text_, weight_ in merged]
