"""The lineage as a picture: per iteration, in order, the challenger's batch metric and holdout
score and the champion's holdout score, promotions and rejections marked.

Each iteration is its own MLflow experiment, so MLflow's UI cannot chart a metric across
them; the lineage records (:mod:`tracker_core.lineage`) can. :func:`plot_lineage` writes a
``.png``, ``.svg`` or ``.pdf`` with matplotlib (installed with MLflow; imported here only),
or an ``.html`` page holding the SVG and a table of the records.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracker_core.errors import ConfigurationError
from tracker_core.lineage import LineageRecord

__all__ = ["FORMATS", "plot_lineage"]

FORMATS = (".png", ".svg", ".pdf", ".html")


def _champion_line(records: Sequence[LineageRecord]) -> list[float | None]:
    """The champion's holdout score after each iteration's decision."""
    line: list[float | None] = []
    current: float | None = None
    for r in records:
        if r.decision == "promoted":
            current = r.holdout
        elif r.decision == "rejected" and r.champion_holdout is not None:
            current = r.champion_holdout
        line.append(current)
    return line


def _values(values: Sequence[float | None]) -> list[float]:
    """Missing values as NaN, which matplotlib leaves as gaps."""
    return [math.nan if v is None else v for v in values]


def _figure(records: Sequence[LineageRecord], title: str) -> Any:
    """A matplotlib ``Figure`` (no pyplot: no global state, no display needed)."""
    from matplotlib.figure import Figure

    xs = list(range(1, len(records) + 1))
    metric = records[0].main_metric
    fig = Figure(figsize=(max(6.0, 0.35 * len(records) + 3), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(
        xs,
        _values([r.best_metric for r in records]),
        "o-",
        color="tab:blue",
        label=f"challenger {metric} (on its batch)",
    )
    holdouts = _values([r.holdout for r in records])
    ax.plot(xs, holdouts, "s--", color="tab:orange", label="challenger holdout")
    champion = _values(_champion_line(records))
    ax.step(xs, champion, where="post", color="tab:green", label="champion holdout")
    for decision, marker, colour in (("promoted", "^", "tab:green"), ("rejected", "x", "tab:red")):
        points = [
            (x, r.holdout) for x, r in zip(xs, records, strict=True) if r.decision == decision
        ]
        if points:
            px, py = zip(*points, strict=True)
            ax.scatter(px, py, marker=marker, s=90, color=colour, zorder=3, label=decision)
    crowded = len(records) > 6
    ax.set_xticks(
        xs,
        [r.batch_id for r in records],
        rotation=45 if crowded else 0,
        ha="right" if crowded else "center",
        fontsize=8,
    )
    ax.set_xlabel("iteration (batch)")
    ax.set_ylabel(metric + (" (lower is better)" if records[0].is_loss else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_lineage(records: Sequence[LineageRecord], path: Path, *, title: str = "") -> Path:
    """Draw ``records`` (in iteration order) into ``path``; its suffix picks the format."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigurationError(f"cannot draw into {path.name}: use one of {', '.join(FORMATS)}")
    if not records:
        raise ConfigurationError("no lineage records to draw (no iteration completed yet)")
    title = title or f"{records[0].plugin_name}: challengers and the champion"
    fig = _figure(records, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        svg = io.StringIO()
        fig.savefig(svg, format="svg")
        path.write_text(_page(records, title, svg.getvalue()))
    else:
        fig.savefig(path, format=suffix[1:], dpi=120)
    return path


def _page(records: Sequence[LineageRecord], title: str, svg: str) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape('' if v is None else str(v))}</td>"
            for v in (
                r.batch_id,
                r.experiment_id,
                r.best_run_id,
                r.best_metric,
                r.holdout,
                r.champion_holdout,
                r.decision,
                r.version,
                r.started_by,
            )
        )
        + "</tr>"
        for r in records
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "batch",
            "experiment",
            "best run",
            records[0].main_metric,
            "holdout",
            "champion holdout",
            "decision",
            "version",
            "started by",
        )
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{svg}"
        f"<table><tr>{head}</tr>{rows}</table></body></html>\n"
    )
