"""Per concept and overall: the means with AlignIT off and on, and the paired difference on − off with a 95 %
bootstrap interval.

A concept's numbers are over its done jobs. Overall is the mean of the concepts' means (as CustomConcept101's table
averages per-concept evaluations); its interval resamples jobs within each concept (paired: a job's on and off go
together), draws from a fixed seed, and averages the concepts' resampled means.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("text_alignment", "image_alignment", "dino_alignment")
SHORT = {"text_alignment": "text", "image_alignment": "image", "dino_alignment": "dino"}
OVERALL = "overall"
BOOTSTRAP_SEED = 0


@dataclass
class Row:
    """One line of the summary; values are NaN where no job is done."""

    name: str
    jobs: int
    done: int
    failed: int
    off: dict[str, float]
    on: dict[str, float]
    diff: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]


def _paired(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(off, on) arrays of shape (done jobs, metrics)."""
    off = np.array([[r["off"][m] for m in METRICS] for r in records], dtype=np.float64).reshape(-1, len(METRICS))
    on = np.array([[r["on"][m] for m in METRICS] for r in records], dtype=np.float64).reshape(-1, len(METRICS))
    return off, on


def _row(
    name: str, jobs: int, done: int, failed: int, off: np.ndarray, on: np.ndarray, diff: np.ndarray, boot: np.ndarray
) -> Row:
    low, high = (np.percentile(boot, q, axis=0) if len(boot) else np.full(len(METRICS), np.nan) for q in (2.5, 97.5))
    as_dict = lambda values: {m: float(v) for m, v in zip(METRICS, values)}  # noqa: E731
    return Row(name, jobs, done, failed, as_dict(off), as_dict(on), as_dict(diff), as_dict(low), as_dict(high))


def summarize(concepts: Sequence[str], results: Sequence[Mapping[str, Any]], samples: int = 1000) -> list[Row]:
    """Rows per concept (in the given order) and overall, from the merged results (one per job)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rows, means, boots = [], [], []
    nan = np.full(len(METRICS), np.nan)
    for name in concepts:
        mine = [r for r in results if r["concept"] == name]
        done = [r for r in mine if r["status"] == "done"]
        failed = sum(r["status"] == "failed" for r in mine)
        off, on = _paired(done)
        if done:
            diffs = on - off
            draws = rng.integers(0, len(done), size=(samples, len(done)))
            boot = diffs[draws].mean(axis=1)
            means.append((off.mean(axis=0), on.mean(axis=0), diffs.mean(axis=0)))
            boots.append(boot)
            rows.append(_row(name, len(mine), len(done), failed, *means[-1], boot))
        else:
            rows.append(_row(name, len(mine), 0, failed, nan, nan, nan, np.empty((0, len(METRICS)))))
    if means:
        off, on, diff = (np.mean([m[i] for m in means], axis=0) for i in range(3))
        overall_boot = np.mean(boots, axis=0)
    else:
        off = on = diff = nan
        overall_boot = np.empty((0, len(METRICS)))
    jobs, done_jobs, failed_jobs = (sum(getattr(row, key) for row in rows) for key in ("jobs", "done", "failed"))
    rows.append(_row(OVERALL, jobs, done_jobs, failed_jobs, off, on, diff, overall_boot))
    return rows


def to_csv(rows: Sequence[Row]) -> str:
    """summary.csv: one row per concept and ``overall``; six decimals."""
    header = ["concept", "jobs", "done", "failed"]
    for metric in METRICS:
        short = SHORT[metric]
        header += [f"{short}_off", f"{short}_on", f"{short}_diff", f"{short}_diff_low", f"{short}_diff_high"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[Any] = [row.name, row.jobs, row.done, row.failed]
        for metric in METRICS:
            cells += [f"{values[metric]:.6f}" for values in (row.off, row.on, row.diff, row.low, row.high)]
        writer.writerow(cells)
    return buffer.getvalue()
