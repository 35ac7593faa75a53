"""Quiet by default: a user's script shows only what it logs (issue 11 item 14, issue 10 §4).

Runs on every backend like :mod:`tracker_core.testing.suite` (a ``backend`` fixture yielding a
:class:`~tracker_core.testing.harness.BackendUnderTest`)::

    from tracker_core.testing.suite_quiet import *  # noqa: F403

"Quiet" means: nothing written to stdout, and no record at WARNING or above from tracker-core
or from the libraries it drives, through the root logger or through a library's own
non-propagating logger (MLflow logs through ``mlflow`` with its own stderr handler).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from tracker_core.params import FineTuningParams
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.values import FineTuningIteration, MetricValue

__all__ = [
    "test_default_format_save_and_load_log_nothing",
    "test_finish_run_prints_nothing",
]

#: loggers that do not propagate to the root logger and print on their own
OWN_HANDLER_LOGGERS = ("mlflow",)


class _Loud(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def loud_records() -> Iterator[list[str]]:
    """The records at WARNING and above logged inside the block, wherever they go."""
    handler = _Loud()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in OWN_HANDLER_LOGGERS)]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@attrs.frozen
class QuietParams(FineTuningParams):
    lr: float


def _tiny_model(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def _iteration(plugin: str) -> FineTuningIteration:
    return FineTuningIteration(plugin_name=plugin, batch_id="quiet")


def test_finish_run_prints_nothing(
    backend: BackendUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over HTTP, MLflow's ``set_terminated`` prints two "View run" lines per run."""
    mgr = backend.connect(params_type=QuietParams)
    try:
        mgr.set_iteration(_iteration(mgr.plugin_name))
        for lr in (0.1, 0.2):
            mgr.set_run(QuietParams(lr=lr))
            mgr.save_metric(MetricValue(mgr.main_metric, lr))
            capsys.readouterr()
            with loud_records() as loud:
                mgr.finish_run()
            assert capsys.readouterr().out == ""
            assert loud == []
    finally:
        mgr.close()


def test_default_format_save_and_load_log_nothing(
    backend: BackendUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    """MLflow logs a pickle WARNING on every save in its ``mlflow.pytorch`` format."""
    # the backend's default model format (state_dict, for one, needs the empty model to load)
    mgr = backend.connect(params_type=QuietParams, model_factory=lambda: _tiny_model(0))
    try:
        capsys.readouterr()
        with loud_records() as loud:
            mgr.upload_initial_model(_tiny_model(0))
            mgr.set_iteration(_iteration(mgr.plugin_name))
            for seed, quality in enumerate((0.3, 0.6)):  # better each time: both are saved
                mgr.set_run(QuietParams(lr=quality))
                mgr.save_metric(MetricValue(mgr.main_metric, quality))
                mgr.save_model(_tiny_model(seed))
                mgr.finish_run()
            assert mgr.download_last_model() is not None
        assert capsys.readouterr().out == ""
        assert loud == []
    finally:
        mgr.close()
