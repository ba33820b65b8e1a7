"""The summary: means, paired differences and their bootstrap intervals, per concept and overall."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from alignit.evaluate.summary import METRICS, summarize, to_csv


def result(concept, off, on, status="done"):
    if status != "done":
        return {"concept": concept, "status": status, "reason": "x"}
    return {
        "concept": concept,
        "status": "done",
        "off": dict(zip(METRICS, off)),
        "on": dict(zip(METRICS, on)),
    }


def test_means_differences_and_overall_by_hand():
    results = [
        result("a", (0.6, 0.8, 0.5), (0.7, 0.8, 0.4)),
        result("a", (0.5, 0.7, 0.5), (0.8, 0.6, 0.5)),
        result("a", (0, 0, 0), (0, 0, 0), status="failed"),
        result("b", (0.4, 0.9, 0.6), (0.6, 0.9, 0.6)),
    ]
    a, b, overall = summarize(["a", "b"], results, samples=200)
    assert (a.jobs, a.done, a.failed) == (3, 2, 1)
    assert a.off["text_alignment"] == pytest.approx(0.55)
    assert a.on["text_alignment"] == pytest.approx(0.75)
    assert a.diff["text_alignment"] == pytest.approx(0.2)
    assert a.diff["image_alignment"] == pytest.approx(-0.05)
    # Overall: the mean of the concepts' means (b counts as much as a though it has one job).
    assert overall.off["text_alignment"] == pytest.approx((0.55 + 0.4) / 2)
    assert overall.diff["text_alignment"] == pytest.approx((0.2 + 0.2) / 2)
    assert (overall.jobs, overall.done, overall.failed) == (4, 3, 1)
    # One job: every resample is that job.
    assert (b.low["text_alignment"], b.high["text_alignment"]) == pytest.approx((0.2, 0.2))
    # a's differences are 0.1 and 0.3: resampled means lie in [0.1, 0.3] and the interval covers the mean.
    assert 0.1 - 1e-12 <= a.low["text_alignment"] < 0.2 < a.high["text_alignment"] <= 0.3 + 1e-12


def test_bootstrap_interval_is_a_paired_one():
    rng = np.random.default_rng(3)
    off = rng.normal(0.6, 0.1, size=200)
    on = off + 0.01 + rng.normal(0, 0.002, size=200)  # a small shift, far below the spread between jobs
    results = [result("a", (x, 0.5, 0.5), (y, 0.5, 0.5)) for x, y in zip(off, on)]
    row = summarize(["a"], results, samples=500)[0]
    # Pairing keeps the interval around the shift narrow (unpaired it would be about ±0.02 wide).
    assert row.low["text_alignment"] > 0.009 and row.high["text_alignment"] < 0.011


def test_concept_without_done_jobs_and_csv():
    rows = summarize(["a", "b"], [result("a", (0.5, 0.5, 0.5), (0.6, 0.5, 0.5)), result("b", (), (), status="failed")])
    table = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [row["concept"] for row in table] == ["a", "b", "overall"]
    assert table[1]["text_off"] == "nan" and table[1]["failed"] == "1"
    assert table[2]["text_diff"] == "0.100000" and table[2]["done"] == "1"


def test_summary_is_reproducible():
    results = [result("a", (i / 10, 0.5, 0.5), ((i % 3) / 10, 0.5, 0.5)) for i in range(10)]
    assert to_csv(summarize(["a"], results)) == to_csv(summarize(["a"], results))
