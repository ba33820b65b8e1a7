"""The plot (per concept: text and image alignment, off vs on; the trade-off of the two) and report.html.

report.html links the images by their paths relative to the output folder, so it opens offline wherever the
folder goes.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .summary import METRICS, OVERALL, Row

LABELS = {"text_alignment": "text", "image_alignment": "image (CLIP)", "dino_alignment": "image (DINO)"}


def plot_png(rows: Sequence[Row]) -> bytes:
    """Text alignment off vs on, image alignment off vs on (bars per concept), and text against image alignment
    with an arrow from off to on for each concept."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [row for row in rows if row.done]
    names = [row.name for row in shown]
    height = max(4.0, 0.28 * len(shown) + 1.5)
    figure, axes = plt.subplots(1, 3, figsize=(16, height), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    positions = range(len(shown))
    for axis, metric in zip(axes[:2], METRICS[:2]):
        axis.barh([p - 0.2 for p in positions], [r.off[metric] for r in shown], height=0.4, label="AlignIT off")
        axis.barh([p + 0.2 for p in positions], [r.on[metric] for r in shown], height=0.4, label="AlignIT on")
        axis.set_yticks(list(positions), names, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(f"{LABELS[metric]} alignment")
    trade = axes[2]
    for row in shown:
        (x0, y0), (x1, y1) = ((side["image_alignment"], side["text_alignment"]) for side in (row.off, row.on))
        bold = row.name == OVERALL
        trade.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "lw": 2 if bold else 0.8})
        trade.scatter([x0], [y0], color="C0", s=30 if bold else 10)
        trade.scatter([x1], [y1], color="C1", s=30 if bold else 10)
        if bold or len(shown) <= 12:
            trade.annotate(row.name, (x1, y1), fontsize=8, xytext=(3, 3), textcoords="offset points")
    trade.set_xlabel("image alignment (CLIP)")
    trade.set_ylabel("text alignment")
    trade.set_title("off (blue) → on (orange)", fontsize=9)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper left", ncols=2, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"


def _scores(side: Mapping[str, Any]) -> str:
    return " · ".join(f"{LABELS[m]} {side[m]:.4f}" for m in METRICS)


def _summary_table(rows: Sequence[Row]) -> str:
    head = "".join(f"<th>{LABELS[m]} off</th><th>{LABELS[m]} on</th><th>on − off [95 % CI]</th>" for m in METRICS)
    lines = [f"<table><tr><th>concept</th><th>done / jobs</th><th>failed</th>{head}</tr>"]
    for row in rows:
        cells = "".join(
            f"<td>{_number(row.off[m])}</td><td>{_number(row.on[m])}</td>"
            f"<td>{_number(row.diff[m])} [{_number(row.low[m])}, {_number(row.high[m])}]</td>"
            for m in METRICS
        )
        name = html.escape(row.name)
        link = f'<a href="#c-{name}">{name}</a>' if row.name != OVERALL else f"<b>{name}</b>"
        lines.append(f"<tr><td>{link}</td><td>{row.done} / {row.jobs}</td><td>{row.failed}</td>{cells}</tr>")
    return "\n".join(lines) + "</table>"


def _job_rows(results: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for result in results:
        head = f"<td>{html.escape(result['prompt'])}<br><small>seed {result['seed']}</small></td>"
        if result["status"] == "done":
            cells = "".join(
                f'<td><img loading="lazy" src="{html.escape(result[side]["image"])}" width="256"><br>'
                f"<small>{_scores(result[side])}</small></td>"
                for side in ("off", "on")
            )
        else:
            reason = html.escape(f"{result['status']}: {result.get('reason', '')}")
            cells = f'<td colspan="2" class="failed">{reason}</td>'
        lines.append(f"<tr>{head}{cells}</tr>")
    return "\n".join(lines)


def report_html(rows: Sequence[Row], results: Sequence[Mapping[str, Any]], plot: str = "plot.png") -> str:
    """The summary, the plot, then per concept every job's image pair with its scores."""
    sections = []
    for row in rows:
        if row.name == OVERALL:
            continue
        mine = [r for r in results if r["concept"] == row.name]
        name = html.escape(row.name)
        sections.append(
            f'<h2 id="c-{name}">{name}</h2>\n<table><tr><th>prompt</th><th>AlignIT off</th><th>AlignIT on</th></tr>\n'
            f"{_job_rows(mine)}</table>"
        )
    style = (
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;vertical-align:top}.failed{color:#a00}img{display:block}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>AlignIT evaluation</title><style>{style}</style>'
        f"</head><body>\n<h1>AlignIT evaluation</h1>\n{_summary_table(rows)}\n"
        f'<p><img src="{plot}" style="max-width:100%"></p>\n' + "\n".join(sections) + "\n</body></html>\n"
    )
