"""Progress bars for long transfers: shown only when a person is watching (stderr is a TTY)
and the transfer is large enough to be worth one."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tracker_core.stores import ProgressCallback

__all__ = ["PROGRESS_MIN_BYTES", "transfer_progress"]

#: transfers smaller than this never show a bar
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


@contextlib.contextmanager
def transfer_progress(
    description: str, *, enabled: bool | None = None
) -> Iterator[ProgressCallback]:
    """Yield a ``(done, total)`` callback that drives a tqdm bar once ``total`` is large.

    ``enabled=None`` means: only if stderr is a TTY.
    """
    show = sys.stderr.isatty() if enabled is None else enabled
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if not show or total < PROGRESS_MIN_BYTES:
            return
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
