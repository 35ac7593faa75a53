"""The soak's table: the trials' results read back from their ``result.json`` files, one
column per trial, one row per invariant, kill point and fault kind."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaos.facts import INVARIANTS, Check
from chaos.proxy import FAULT_KINDS
from chaos.settings import TrialResult

__all__ = ["load_results", "table"]


def load_results(*outs: Path) -> list[TrialResult]:
    """The results of the trials run under the folders ``outs``, by seed.

    Every trial leaves its ``result.json``; a failing one (or any, with ``--keep-all``) also
    its data, and is marked as kept there. A soak split across processes (each its own
    ``--out``) is reported as one table this way.
    """
    results = []
    for path in sorted(p for out in outs for p in Path(out).glob("trial-*/result.json")):
        data = json.loads(path.read_text())
        settings = data["settings"]
        result = TrialResult(data["seed"], settings["storage"], settings["keep"], settings["shape"])
        result.runs, result.seconds = data["runs"], data["seconds"]
        result.kills, result.armed = Counter(data["kills"]), Counter(data["armed"])
        result.faults = {k: Counter(v) for k, v in data["faults"].items()}
        result.retried, result.restarts = Counter(data["retried"]), data["restarts"]
        result.checks = {
            k: Check(v["held"], list(v["problems"])) for k, v in data["checks"].items()
        }
        if any(p.name != "result.json" for p in path.parent.iterdir()):
            result.kept_at = str(path.parent)
        results.append(result)
    return sorted(results, key=lambda r: r.seed)


# ---------------------------------------------------------------------- the table
def _columns(results: Sequence[TrialResult]) -> list[tuple[str, list[TrialResult]]]:
    groups: dict[str, list[TrialResult]] = {}
    for r in results:
        groups.setdefault(f"{r.storage} keep={r.keep}", []).append(r)
    return [*sorted(groups.items()), ("all", list(results))]


def table(results: Sequence[TrialResult], seconds: float, *, title: str = "") -> str:
    """The soak's one table, in Markdown."""
    columns = _columns(results)
    rows: list[list[str]] = []

    def row(label: str, values: Sequence[object]) -> None:
        rows.append([label, *(str(v) for v in values)])

    def total(get: Any) -> list[int]:
        return [sum(get(r) for r in rs) for _, rs in columns]

    row("trials", [len(rs) for _, rs in columns])
    row("trials of shape one / sequence", [
        f"{sum(r.shape == 'one' for r in rs)} / {sum(r.shape == 'sequence' for r in rs)}"
        for _, rs in columns
    ])  # fmt: skip
    row("runs", total(lambda r: r.runs))
    row("worker restarts", total(lambda r: r.restarts))
    kill_points = sorted({k for r in results for k in r.kills})
    row("**kills**", total(lambda r: sum(r.kills.values())))
    for point in kill_points:
        row(f"&nbsp; {point}", total(lambda r, p=point: r.kills[p]))
    row("**requests through the proxies**", total(
        lambda r: sum(v["requests"] for v in r.faults.values())
    ))  # fmt: skip
    row("**faults injected**", total(
        lambda r: sum(sum(v[k] for k in FAULT_KINDS) for v in r.faults.values())
    ))  # fmt: skip
    for kind in FAULT_KINDS:
        row(f"&nbsp; {kind}", total(lambda r, k=kind: sum(v[k] for v in r.faults.values())))
    for server in ("mlflow", "s3", "gcs"):
        row(f"&nbsp; at {server}", total(
            lambda r, s=server: sum(r.faults.get(s, Counter())[k] for k in FAULT_KINDS)
        ))  # fmt: skip
    operations = sorted({k for r in results for k in r.retried})
    row("**operations retried**", total(lambda r: sum(r.retried.values())))
    for op in operations:
        row(f"&nbsp; {op}", total(lambda r, o=op: r.retried[o]))
    row("**invariant held (trials)**", ["" for _ in columns])
    for key, label in INVARIANTS:
        cells = []
        for _, rs in columns:
            applicable = [r for r in rs if r.checks.get(key, Check()).held is not None]
            held = sum(r.checks.get(key, Check()).held is True for r in applicable)
            cells.append(f"{held}/{len(applicable)}" if applicable else "n/a")
        row(f"&nbsp; {label}", cells)
    row("trial time (s), sum", [round(sum(r.seconds for r in rs)) for _, rs in columns])
    header = ["", *(name for name, _ in columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *(["---:"] * len(columns))]) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    failed = [r.seed for r in results if not r.passed]
    head = title or f"chaos soak, {when}: {len(results)} trials in {seconds / 60:.1f} min"
    foot = f"failing seeds: {', '.join(map(str, failed))}" if failed else "no trial failed"
    return "\n".join([head, "", *lines, "", foot])
