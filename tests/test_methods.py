"""Fine-tuning method plug-ins: discovery, checks and params helpers (no store needed)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
from test_finetune import SETS, ToyMethod, ToyParams

from tracker_core import ConfigurationError, connect
from tracker_core.finetune import parse_iteration_name, run_iteration
from tracker_core.methods import (
    METHOD_GROUP,
    FineTuningMethod,
    available_methods,
    connect_kwargs,
    grid_params,
    load_method,
    sample_params,
)
from tracker_core.testing.harness import fresh_sqlite_uri
from tracker_core.values import FineTuningIteration


def make_method() -> ToyMethod:
    return ToyMethod(SETS, name="from-factory")


NOT_A_METHOD = object()


def test_load_method_by_path_object_class_and_factory() -> None:
    method = ToyMethod(SETS)
    assert load_method(method) is method
    assert load_method(f"{__name__}:make_method").name == "from-factory"
    with pytest.raises(ConfigurationError, match="is not a FineTuningMethod"):
        load_method(f"{__name__}:NOT_A_METHOD")
    with pytest.raises(ConfigurationError, match="cannot import"):
        load_method("no_such_module_xyz:thing")
    with pytest.raises(ConfigurationError, match="cannot import"):
        load_method(f"{__name__}:missing_attr")


def test_unknown_entry_point_lists_installed_names() -> None:
    installed = available_methods()
    assert installed == sorted(
        ep.name for ep in importlib.metadata.entry_points(group=METHOD_GROUP)
    )
    with pytest.raises(ConfigurationError) as caught:
        load_method("no-such-method")
    message = str(caught.value)
    assert "no-such-method" in message and METHOD_GROUP in message and "installed:" in message


def test_incomplete_method_is_rejected() -> None:
    class Nameless(ToyMethod):
        pass

    method = Nameless(SETS)
    method.name = ""
    with pytest.raises(ConfigurationError, match="has no 'name'"):
        load_method(method)

    class NotAMethod:
        name = "x"

    with pytest.raises(ConfigurationError, match="must be a FineTuningMethod"):
        connect_kwargs(NotAMethod())  # type: ignore[arg-type]


def test_connect_kwargs() -> None:
    method = ToyMethod(SETS)
    kwargs = connect_kwargs(method)
    assert kwargs["plugin_name"] == method.name
    assert kwargs["main_metric"] == "quality" and kwargs["is_loss"] is False
    assert kwargs["params_type"] is ToyParams and kwargs["model_format"] == "state_dict"
    assert kwargs["model_factory"] is method.model_factory


def test_grid_and_sample_params() -> None:
    grid = grid_params(ToyParams, lr=[0.1, 0.2], quality=[0.5, 0.6, 0.7])
    assert len(grid) == 6 and grid[0] == ToyParams(lr=0.1, quality=0.5)
    assert len({p.id for p in grid}) == 6
    a = sample_params(ToyParams, 3, 42, lr=[0.1, 0.2], quality=[0.5, 0.6, 0.7])
    b = sample_params(ToyParams, 3, 42, lr=[0.1, 0.2], quality=[0.5, 0.6, 0.7])
    assert a == b and len(set(a)) == 3 and set(a) <= set(grid)
    assert sample_params(ToyParams, 10, 0, lr=[0.1], quality=[0.5]) == [ToyParams(0.1, 0.5)]


def test_parse_iteration_name_round_trips() -> None:
    iteration = FineTuningIteration("my plugin", "batch-7", run_id="a" * 32)
    assert parse_iteration_name(str(iteration)) == iteration
    assert parse_iteration_name("my plugin / iteration / initial") is None
    assert parse_iteration_name("something else") is None


def test_run_iteration_rejects_a_manager_for_another_method(tmp_path: Path) -> None:
    method = ToyMethod(SETS)
    manager = connect(
        str(tmp_path / "artifacts"),
        tracking_uri=fresh_sqlite_uri(tmp_path),
        **{**connect_kwargs(method), "main_metric": "other"},
    )
    with manager, pytest.raises(ConfigurationError, match="main metric"):
        run_iteration(method, manager, "batch-1")
    assert method.trained == []


def test_abstract_interface() -> None:
    with pytest.raises(TypeError):
        FineTuningMethod()  # type: ignore[abstract]

    class Minimal(FineTuningMethod[ToyParams]):
        name = "minimal"
        params_type = ToyParams
        main_metric = "m"

        def initial_model(self) -> Any:
            return None

        def initial_params(self, seed: int | None = None) -> list[ToyParams]:
            return []

        def train(self, model: Any, params: ToyParams, manager: Any) -> Any:
            return model

        def evaluate(self, model: Any, params: ToyParams, manager: Any) -> float:
            return 0.0

    assert load_method(Minimal()).name == "minimal"
    assert repr(Minimal()) == "<Minimal 'minimal'>"
