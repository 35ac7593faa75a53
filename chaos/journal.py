"""A worker's local journal: one JSON object a line, each line fsync'd before the worker goes on.

A worker writes what it is about to log (its metric points, with their steps and timestamps)
*before* handing them to tracker-core, what it uploaded (the SHA-256 of every model file), what
it saved and finished, and the kill point it dies at. ``kill -9`` cannot lose a line that was
written: the audit compares the tracking server and the bucket with these lines.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Journal", "read_journal", "read_journals"]


class Journal:
    """Appends fsync'd JSON lines to ``path`` (created if missing)."""

    def __init__(self, path: Path, **context: Any) -> None:
        self.path = Path(path)
        self.context = context
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: str, **fields: Any) -> None:
        record = {"ev": event, "t": round(time.time(), 3), **self.context, **fields}
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        os.write(self._fd, line)
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one journal; a torn last line (a kill inside write) is skipped."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def read_journals(folder: Path) -> list[dict[str, Any]]:
    """Every record of every ``*.jsonl`` journal in ``folder``, in time order."""
    records = [r for path in sorted(Path(folder).glob("*.jsonl")) for r in read_journal(path)]
    return sorted(records, key=lambda r: r["t"])
