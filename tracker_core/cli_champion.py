"""The ``tracker-core`` commands about the champion and where models came from:
``champion`` (show it), ``promote RUN`` and ``rollback`` (a person's decision, recorded with
who made it) and ``lineage [RUN|VERSION|@ALIAS]`` (the chain back to the initial model, as a
table, ``--json``, or a picture with ``--plot FILE``)."""

from __future__ import annotations

import argparse
import datetime
import getpass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tracker_core.cli_common import Output, _fmt, _manager, _table
from tracker_core.errors import ModelNotFoundError, PromotionError
from tracker_core.lineage import Lineage, LineageRecord
from tracker_core.manager import ExperimentsManager
from tracker_core.promotion import Champion, Decision, PromotionConfig, reason_of

__all__ = ["add_champion_commands"]


def add_champion_commands(sub: Any) -> None:
    """The parsers of ``champion``, ``promote``, ``rollback`` and ``lineage``."""

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        p.add_argument(
            "--registered-model", metavar="NAME", help="the registered model (default: --plugin)"
        )
        return p

    p = command("champion", "show the champion and the rollback model of --plugin")
    p.set_defaults(func=cmd_champion)

    for name, help in (
        ("promote", "make a run's model the champion (a person's decision)"),
        ("rollback", "make the rollback model the champion again (and the champion the rollback)"),
    ):
        p = command(name, help)
        if name == "promote":
            p.add_argument("run", help="the run whose model serves from now on")
        p.add_argument("--by", default=_user(), help="who decides (default: %(default)s)")
        p.add_argument("--reason", default="", help="why, recorded on the version")
        p.set_defaults(func=cmd_promote if name == "promote" else cmd_rollback)

    p = command("lineage", "where a model came from: its iterations back to the initial model")
    p.add_argument(
        "ref",
        nargs="?",
        default="@champion",
        help="a run id, a version number, or @ALIAS (default: @champion)",
    )
    p.add_argument("--plot", metavar="FILE", help="draw every iteration (.png, .svg, .html, .pdf)")
    p.set_defaults(func=cmd_lineage)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container)
        return "unknown"


def _connect(args: argparse.Namespace) -> ExperimentsManager:
    return _manager(args, plugin=True, promotion=PromotionConfig(args.registered_model))


def _when(ms: int | str | None) -> str:
    if not ms:
        return ""
    return datetime.datetime.fromtimestamp(int(ms) / 1000, datetime.UTC).isoformat(
        timespec="seconds"
    )


def _champion_json(found: Champion | None) -> dict[str, Any] | None:
    if found is None:
        return None
    v = found.version
    return {
        "version": v.version,
        "run_id": v.run_id,
        "experiment_id": v.tags.get("tracker.experiment_id"),
        "batch_id": v.tags.get("tracker.batch_id"),
        "holdout": found.holdout,
        "source": v.source,
        "promoted_by": v.tags.get("tracker.promoted_by"),
        "promoted_at": _when(v.tags.get("tracker.promoted_ms")),
        "reason": v.tags.get("tracker.reason"),
        "run_exists": found.run is not None,
    }


def cmd_champion(args: argparse.Namespace, out: Output) -> int:
    with _connect(args) as manager:
        promoter = manager.promotion
        name, config = promoter.name, promoter.config
        current = _champion_json(promoter.champion())
        previous = _champion_json(promoter.champion(config.rollback_alias))
    data = {
        "registered_model": name,
        "model_uri": f"models:/{name}@{config.champion_alias}",
        config.champion_alias: current,
        config.rollback_alias: previous,
    }

    def table() -> Iterator[str]:
        if current is None:
            yield f"registered model {name!r} has no {config.champion_alias!r} yet"
            return
        for alias, item in ((config.champion_alias, current), (config.rollback_alias, previous)):
            if item is None:
                continue
            yield (
                f"models:/{name}@{alias}: version {item['version']}, run {item['run_id']} "
                f"(iteration {item['experiment_id']}, batch {item['batch_id']})"
            )
            yield f"  holdout {_fmt(item['holdout'])}; {item['reason']}"
            yield f"  by {item['promoted_by']} at {item['promoted_at']}"

    out.emit(data, table)
    return 0


def _decision(decision: Decision, out: Output) -> int:
    out.emit(
        decision.to_json(),
        lambda: iter(
            [
                f"models:/{decision.registered_model}@champion is version {decision.version} "
                f"(run {decision.run_id}), {decision.outcome.value} by {decision.decided_by}",
                f"  was version {decision.champion_version} (run {decision.champion_run_id})",
                f"  {reason_of(decision)}",
            ]
        ),
    )
    return 0


def cmd_promote(args: argparse.Namespace, out: Output) -> int:
    with _connect(args) as manager:
        decision = manager.promotion.promote_run(args.run, by=args.by, reason=args.reason)
    return _decision(decision, out)


def cmd_rollback(args: argparse.Namespace, out: Output) -> int:
    with _connect(args) as manager:
        decision = manager.promotion.rollback(by=args.by, reason=args.reason)
    return _decision(decision, out)


def _resolve(manager: ExperimentsManager, ref: str, records: list[LineageRecord]) -> str:
    """The run id a reference names: a run id, a version number, or @ALIAS."""
    if ref.startswith("@") or ref.isdigit():
        promoter = manager.promotion
        if not promoter.available:
            raise PromotionError("this tracking store has no model registry to resolve " + ref)
        found = (
            promoter.registry.get_version_by_alias(promoter.name, ref[1:])
            if ref.startswith("@")
            else promoter.registry.get_version(promoter.name, ref)
        )
        if found is None or not found.run_id:
            if ref == "@champion" and records and records[-1].best_run_id:
                return records[-1].best_run_id  # no champion: the newest iteration's best
            raise ModelNotFoundError(f"registered model {promoter.name!r} has no {ref}")
        return found.run_id
    return ref


def cmd_lineage(args: argparse.Namespace, out: Output) -> int:
    with _connect(args) as manager:
        records = manager.lineage.records()
        if not records:
            raise ModelNotFoundError(f"no lineage recorded for plugin {args.plugin!r}")
        run_id = _resolve(manager, args.ref, records)
    chain = Lineage.chain(records, run_id)
    plotted = None
    if args.plot:
        from tracker_core.lineage_plot import plot_lineage

        plotted = plot_lineage(records, Path(args.plot))
    data = {
        "ref": args.ref,
        "run_id": run_id,
        "chain": [r.to_json() for r in chain],
        "reaches_initial": bool(chain and chain[-1].started_from_initial),
        "plot": str(plotted) if plotted else None,
    }

    def table() -> Iterator[str]:
        yield f"{args.ref} (run {run_id}): {len(chain)} iteration(s) back to the initial model"
        rows = [
            [
                r.batch_id,
                r.experiment_id,
                r.best_run_id,
                _fmt(r.best_metric),
                _fmt(r.holdout),
                r.decision or "",
                r.version or "",
                r.start_run_id + (" (initial)" if r.started_from_initial else ""),
                r.started_by,
            ]
            for r in chain
        ]
        metric = chain[0].main_metric if chain else "metric"
        headers = ["batch", "iteration", "best run", metric, "holdout", "decision", "version"]
        yield from _table([*headers, "started from", "started by"], rows)
        if chain and not chain[-1].started_from_initial:
            yield "(the chain ends at a record whose start model no record knows)"
        if plotted:
            yield f"plot of {len(records)} iteration(s): {plotted}"

    out.emit(data, table)
    return 0
