"""Behaviour suite for fine-tuning params: every supported type through a real tracking store.

Each test takes the ``backend`` fixture (a :class:`~tracker_core.testing.harness.BackendUnderTest`),
as in :mod:`tracker_core.testing.suite`; import the tests into a module that defines it::

    from tracker_core.testing.suite_params import *  # noqa: F403

:class:`EveryType` uses every supported field type (see :mod:`tracker_core.params`) and
:func:`examples` gives values at their edges; the unit tests reuse both. :class:`Basic` has
only the types of the first release.
"""

from __future__ import annotations

import enum
from typing import Literal

import attrs
import pytest

from tracker_core.errors import InvalidParamsError
from tracker_core.manager import ExperimentsManager
from tracker_core.params import MAX_PARAM_KEY_LENGTH, MAX_PARAM_VALUE_LENGTH, FineTuningParams
from tracker_core.stores import RunQuery
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import tiny_model
from tracker_core.values import FineTuningIteration, MetricValue

__all__ = [
    "Basic",
    "EveryType",
    "Level",
    "Optimizer",
    "Schedule",
    "examples",
]  # and the tests, added at the end


class Optimizer(enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.frozen
class Schedule:
    """A nested frozen attrs class (not a FineTuningParams)."""

    kind: Literal["cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    milestones: tuple[float, ...] = ()


@attrs.frozen
class EveryType(FineTuningParams):
    """Params with every supported field type, nested where it round-trips."""

    lr: float
    epochs: int = 1
    freeze: bool = False
    note: str = ""
    optimizer: Optimizer = Optimizer.ADAM
    level: Level = Level.LOW
    mode: Literal["fast", "exact"] = "fast"
    bits: Literal[4, 8, 16] | None = None
    layers: list[int] = attrs.field(factory=lambda: [8, 4])
    dropouts: tuple[float, ...] = (0.1,)
    shape: tuple[int, str, bool] = (1, "x", False)
    weights: dict[str, float] = attrs.field(factory=dict)
    warmup: float | None = None
    names: list[str] | None = None
    grid: list[list[int]] = attrs.field(factory=list)
    choices: dict[str, tuple[Optimizer, Literal["a", "b"] | None]] = attrs.field(factory=dict)
    schedule: Schedule = attrs.field(factory=Schedule)
    schedules: list[Schedule] = attrs.field(factory=list)
    maybe_schedule: Schedule | None = None


@attrs.frozen
class Basic(FineTuningParams):
    """Params with the types of the first release only."""

    lr: float
    note: str = ""
    layers: list[int] = attrs.field(factory=list)
    names: list[str] | None = None


def examples() -> list[EveryType]:
    """Values at the edges of every type; each must come back equal, with the same id."""
    return [
        EveryType(lr=0.001),
        EveryType(
            lr=3,  # an int in a float field: stored as 3.0
            epochs=-(2**62),
            freeze=True,
            note='  a, b\r\n\tc é 漢字 🎉 null "quoted" \\ ',
            optimizer=Optimizer.SGD,
            level=Level.HIGH,
            mode="exact",
            bits=8,
            layers=[],
            dropouts=(0.0, 1e-300, 1.7976931348623157e308),
            shape=(-1, "", True),
            weights={"z": 1.0, "a": -2.5, "": 0.1, "é 🎉": 1e-9},
            warmup=0.0,
            names=["", "null", "[1]", "a\nb"],
            grid=[[1, 2], [], [3]],
            choices={"x": (Optimizer.ADAM, "a"), "y": (Optimizer.SGD, None)},
            schedule=Schedule("linear", 100, (0.5, 0.75)),
            schedules=[Schedule(), Schedule("linear", 1, (1.0,))],
            maybe_schedule=Schedule(milestones=(0.25,)),
        ),
        EveryType(lr=0.5, note="null"),
        EveryType(lr=0.25, note="1.5"),
        EveryType(lr=0.125, note="é" * MAX_PARAM_VALUE_LENGTH),  # the limit itself is kept whole
        EveryType(lr=0.0625, names=["x" * (MAX_PARAM_VALUE_LENGTH - 4)]),  # JSON '["x..."]': 6000
    ]


def _iteration(mgr: ExperimentsManager, batch: str) -> FineTuningIteration:
    return FineTuningIteration(plugin_name=mgr.plugin_name, batch_id=batch)


def _run(
    mgr: ExperimentsManager, params: FineTuningParams, quality: float, *, save: bool = False
) -> str:
    mgr.set_run(params)
    run_id = mgr.current_run_id
    assert run_id is not None
    mgr.save_metric(MetricValue(mgr.main_metric, quality))
    if save:
        mgr.save_model(tiny_model())
    mgr.finish_run()
    return run_id


def _assert_same(back: EveryType, params: EveryType) -> None:
    assert back == params and back.id == params.id
    assert type(back.lr) is float and type(back.epochs) is int and type(back.freeze) is bool
    assert isinstance(back.optimizer, Optimizer) and isinstance(back.level, Level)
    assert type(back.dropouts) is tuple and type(back.shape) is tuple
    assert type(back.schedule) is Schedule and type(back.schedule.milestones) is tuple
    assert all(type(v) is tuple for v in back.choices.values())
    assert list(back.weights) == list(params.weights)  # key order kept too


def test_every_supported_type_round_trips_through_the_store(backend: BackendUnderTest) -> None:
    mgr = backend.connect(params_type=EveryType)
    try:
        mgr.set_iteration(_iteration(mgr, "b1"))
        for index, params in enumerate(examples()):
            run_id = _run(mgr, params, float(index))
            run = mgr.get_run_by_id(run_id)
            assert run is not None
            _assert_same(EveryType.from_mlflow(run.params), params)
    finally:
        mgr.close()


def test_int_and_float_of_one_value_are_one_run(backend: BackendUnderTest) -> None:
    mgr = backend.connect(params_type=Basic)
    try:
        mgr.set_iteration(_iteration(mgr, "b1"))
        first = _run(mgr, Basic(lr=1), 0.5)
        assert mgr.set_run(Basic(lr=1.0)) is True  # the same run, finished: skip it
        experiment_id = mgr.current_experiment_id
        assert experiment_id is not None
        assert [r.run_id for r in mgr.tracking.search_runs(RunQuery((experiment_id,)))] == [first]
    finally:
        mgr.close()


def test_wrong_value_type_refused_so_the_next_iteration_reads_its_params(
    backend: BackendUnderTest,
) -> None:
    mgr = backend.connect(params_type=Basic, model_format="state_dict")
    try:
        mgr.set_iteration(_iteration(mgr, "b1"))
        _run(mgr, Basic(lr=0.1), 0.5, save=True)
        with pytest.raises(InvalidParamsError, match=r"Basic\.lr is declared float, got '0\.2'"):
            _run(mgr, Basic(lr="0.2"), 0.9)  # type: ignore[arg-type]
        mgr.finish_iteration()
        mgr.set_iteration(_iteration(mgr, "b2"))
        assert mgr.get_top_params() == [Basic(lr=0.1)]
    finally:
        mgr.close()


LONG_FIELD = "f" * (MAX_PARAM_KEY_LENGTH - len("params.") + 1)
#: a field name whose MLflow key ``params.<name>`` is one character over MLflow's limit
LongFieldName = attrs.make_class(
    "LongFieldName",
    {LONG_FIELD: attrs.field(type=int, default=0)},
    (FineTuningParams,),
    frozen=True,
)


def test_too_long_params_refused_before_anything_is_written(backend: BackendUnderTest) -> None:
    mgr = backend.connect(params_type=Basic)
    try:
        too_long = {
            "note": "x" * (MAX_PARAM_VALUE_LENGTH + 1),
            "names": ["x" * (MAX_PARAM_VALUE_LENGTH - 3)],  # its JSON form is one over
            "layers": [1] * (MAX_PARAM_VALUE_LENGTH // 3 + 1),  # '[1, 1, ...]'
        }
        for field, value in too_long.items():
            with pytest.raises(InvalidParamsError, match=rf"{field}.*{MAX_PARAM_VALUE_LENGTH}"):
                Basic(lr=0.1, **{field: value})  # type: ignore[arg-type]
        with pytest.raises(InvalidParamsError, match=str(MAX_PARAM_KEY_LENGTH)):
            LongFieldName()
        assert mgr.get_experiments() == []

        mgr.set_iteration(_iteration(mgr, "b1"))
        experiment_id = mgr.current_experiment_id
        assert experiment_id is not None
        with pytest.raises(InvalidParamsError, match=str(MAX_PARAM_VALUE_LENGTH)):
            mgr.set_run(Basic(lr=0.1, note="x" * (MAX_PARAM_VALUE_LENGTH + 1)))
        with pytest.raises(InvalidParamsError, match=str(MAX_PARAM_KEY_LENGTH)):
            mgr.set_run(LongFieldName())
        assert mgr.tracking.search_runs(RunQuery((experiment_id,))) == []
        assert mgr.current_run_id is None
    finally:
        mgr.close()


def test_get_top_params_returns_every_type_typed(backend: BackendUnderTest) -> None:
    sent = examples()
    mgr = backend.connect(params_type=EveryType, n_top_runs=len(sent), model_format="state_dict")
    try:
        mgr.set_iteration(_iteration(mgr, "b1"))
        for index, params in enumerate(sent):  # the best (last) run keeps a model
            _run(mgr, params, float(index), save=index == len(sent) - 1)
        first = mgr.current_experiment_id
        assert first is not None
        mgr.finish_iteration()
        mgr.set_iteration(_iteration(mgr, "b2"))
        top: list[EveryType] | None = mgr.get_top_params()
        assert top is not None and len(top) == len(sent)
        for back, params in zip(top, reversed(sent), strict=True):  # best first
            _assert_same(back, params)
    finally:
        mgr.close()
    # a manager not told the params type finds it from the runs
    reader = backend.connect(plugin_name=mgr.plugin_name)
    try:
        again: list[EveryType] | None = reader.get_top_params_by_experiment_id(first)
        assert again is not None and again == top and [p.id for p in again] == [p.id for p in top]
    finally:
        reader.close()


__all__ += sorted(name for name in globals() if name.startswith("test_"))
