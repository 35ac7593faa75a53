"""The ``tracker-core`` commands that reconcile the stores: ``gc`` (models, uploads and twin
runs no run needs) and ``verify`` (marked models whose files are gone)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import attrs

from tracker_core.cli_common import Output, _manager, _table
from tracker_core.errors import CleanupRefusedError


def cmd_gc(args: argparse.Namespace, out: Output) -> int:
    with _manager(args) as manager:
        store = manager.artifacts
        scan = manager.find_orphaned_models(
            include_running=args.include_running, max_depth=args.max_depth
        )
        if args.delete and (scan.orphans or scan.uploads) and scan.experiments == 0:
            raise CleanupRefusedError(
                f"gc --delete: no experiment of the tracking store {manager.tracking_uri} keeps "
                f"its models under {store.root}, so every model there looks orphaned; check "
                "--tracking-uri and --artifact-uri (nothing was deleted)"
            )
        orphans: list[dict[str, Any]] = [attrs.asdict(o) for o in scan.orphans]
        uploads: list[dict[str, Any]] = [attrs.asdict(u) for u in scan.uploads]
        twins: list[dict[str, Any]] = [attrs.asdict(t) for t in scan.twins]
        if args.delete:
            for orphan, model in zip(orphans, scan.orphans, strict=True):
                orphan["deleted"] = manager.delete_orphaned_model(model)
            for item, upload in zip(uploads, scan.uploads, strict=True):
                manager.abort_orphaned_upload(upload)
                item["aborted"] = True
            for item, twin in zip(twins, scan.twins, strict=True):
                item["deleted"] = manager.delete_abandoned_twin(twin)
    skipped = [attrs.asdict(o) for o in scan.skipped]
    skipped_uploads = [attrs.asdict(u) for u in scan.skipped_uploads]
    missing = [attrs.asdict(m) for m in scan.missing]
    data = {
        "root": store.root,
        "dry_run": not args.delete,
        "orphans": orphans,
        "skipped": skipped,
        "uploads": uploads,
        "skipped_uploads": skipped_uploads,
        "missing": missing,
        "twins": twins,
        "marked_models": scan.marked_models,
    }

    def table() -> Iterator[str]:
        verb = "deleted" if args.delete else "would delete"
        yield (
            f"{len(orphans)} orphaned model folder(s) under {store.root} ({verb}); "
            f"{scan.marked_models} marked model(s) kept"
        )
        if orphans:
            yield from _table(["folder", "reason"], [[o["uri"], o["reason"]] for o in orphans])
        if uploads:
            yield (
                f"{len(uploads)} incomplete upload(s) "
                f"({'aborted' if args.delete else 'would abort'}):"
            )
            yield from _table(["object", "reason"], [[u["uri"], u["reason"]] for u in uploads])
        if twins:
            yield f"{len(twins)} run(s) their creators left beside a run of the same name ({verb}):"
            rows = [[t["run_id"], t["run_name"], t["kept_run_id"]] for t in twins]
            yield from _table(["run", "name", "kept run"], rows)
        for s in skipped:
            yield f"skipped {s['uri']}: {s['reason']} (use --include-running if it is dead)"
        for u in skipped_uploads:
            yield f"skipped upload of {u['uri']}: {u['reason']}"
        for m in missing:
            yield f"run {m['run_id']} is marked as holding {m['uri']}, but its files are gone"
        if missing:
            yield "marked models without files: see `tracker-core verify` (and `--unmark`)"
        if (orphans or uploads or twins) and not args.delete:
            yield "dry run: nothing deleted; run again with --delete to delete them"

    out.emit(data, table)
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    with _manager(args) as manager:
        store = manager.artifacts
        scan = manager.find_models_missing_files()
        missing: list[dict[str, Any]] = [attrs.asdict(m) for m in scan.missing]
        if args.unmark:
            for item, model in zip(missing, scan.missing, strict=True):
                item["unmarked"] = manager.unmark_model_missing_files(model)
    remaining = [m for m in missing if not m.get("unmarked")]
    data = {
        "root": store.root,
        "checked": scan.checked,
        "missing": missing,
        "outside": list(scan.outside),
    }

    def table() -> Iterator[str]:
        yield (
            f"{scan.checked} marked model(s) under {store.root} checked: "
            f"{len(missing)} with their files gone"
        )
        if missing:
            rows = [
                [
                    m["run_id"],
                    m["experiment_id"],
                    "unmarked" if m.get("unmarked") else "live worker" if m["live"] else "marked",
                    m["uri"],
                ]
                for m in missing
            ]
            yield from _table(["run", "experiment", "state", "model"], rows)
        if scan.outside:
            yield f"{len(scan.outside)} marked model(s) live in another store: not checked"
        if remaining and not args.unmark:
            yield "run again with --unmark to unmark them (an initial model can then be uploaded)"

    out.emit(data, table)
    return 1 if remaining else 0
