"""The step range: which sampling steps use the AlignIT conditioning, in the WebUI's schedule form.

The WebUI stores a prompt's conditioning as ``[(end_at_step, cond), ...]`` and, at sampling step t (from 0), uses
the first entry with ``t <= end_at_step`` (A1111 ``prompt_parser.reconstruct_cond_batch``). Splitting those entries
at the range's edges makes the WebUI itself switch between plain and AlignIT rows: nothing runs per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def active_steps(total_steps: int, start: float, end: float) -> tuple[int, int | None]:
    """First and last step (inclusive, from 0) that use AlignIT rows; None as last means to the end."""
    first = math.ceil(start * total_steps - 1e-9)
    last = None if end >= 1.0 else math.ceil(end * total_steps - 1e-9) - 1
    return first, last


def refine_schedule(schedule: Sequence[tuple[int, T]], aligned: Sequence[T], start: float, end: float) -> list[tuple[int, T]]:
    """Merge a plain schedule and its AlignIT counterpart (same length) for the step range ``[start, end)``.

    The range is a fraction of the schedule's length (its last ``end_at_step``), as prompt editing's fractions are.
    """
    if len(schedule) != len(aligned):
        raise ValueError("a schedule and its AlignIT counterpart differ in length")
    if not schedule:
        return []
    first, last = active_steps(schedule[-1][0], start, end)
    result: list[tuple[int, T]] = []
    low = -1  # entries cover the steps (low, end_at_step]
    for (high, plain), spliced in zip(schedule, aligned):
        before_end = min(high, first - 1)
        if before_end > low:
            result.append((before_end, plain))
        inside_low, inside_high = max(low, first - 1), high if last is None else min(high, last)
        if inside_high > inside_low:
            result.append((inside_high, spliced))
        if last is not None and high > max(low, last):
            result.append((high, plain))
        low = high
    return result
