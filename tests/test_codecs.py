"""Typed errors from the model formats (issue 11 item 10): each raised at the first call that
can know, naming the format, what it needs, and (for loads) where the files came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

import tracker_core
from tracker_core.codecs import StateDictCodec
from tracker_core.errors import ConfigurationError, InvalidModelError, ModelLoadError
from tracker_core.manager import ExperimentsManager
from tracker_core.testing.harness import fresh_sqlite_uri


def folder(tmp_path: Path, name: str = "model") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def manager(tmp_path: Path, **kwargs: Any) -> ExperimentsManager:
    return tracker_core.connect(
        str(tmp_path / "models"),
        tracking_uri=fresh_sqlite_uri(tmp_path),
        main_metric="quality",
        plugin_name="p",
        **kwargs,
    )


# -- saving something that is not a torch.nn.Module ----------------------------------------


def test_default_format_refuses_a_non_module(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from tracker_core_mlflow import MlflowPytorchCodec

    target = folder(tmp_path)
    with pytest.raises(InvalidModelError) as info:
        MlflowPytorchCodec().save({"weight": torch.zeros(2)}, target)
    assert "mlflow.pytorch" in str(info.value) and "torch.nn.Module" in str(info.value)
    assert "dict" in str(info.value)
    assert target.is_dir() and not any(target.iterdir())


def test_state_dict_format_refuses_a_non_module(tmp_path: Path) -> None:
    target = folder(tmp_path)
    with pytest.raises(InvalidModelError) as info:
        StateDictCodec().save(torch.nn.Linear(2, 2).state_dict(), target)
    message = str(info.value)
    assert "state_dict" in message and "torch.nn.Module" in message
    assert "not its state_dict()" in message
    assert not any(target.iterdir())


@pytest.mark.parametrize("model_format", ["mlflow.pytorch", "state_dict"])
def test_manager_refuses_a_non_module_and_uploads_nothing(
    tmp_path: Path, model_format: str
) -> None:
    mgr = manager(tmp_path, model_format=model_format, model_factory=lambda: torch.nn.Linear(2, 2))
    with pytest.raises(InvalidModelError):
        mgr.upload_initial_model(object())
    assert not mgr.has_initial_model()
    assert isinstance(InvalidModelError("x"), ConfigurationError)  # caught as before


# -- loading state_dict weights ----------------------------------------------------------------


def saved_linear(tmp_path: Path, features: int = 4) -> Path:
    target = folder(tmp_path, "saved")
    StateDictCodec().save(torch.nn.Linear(features, 2), target)
    return target


def test_state_dict_load_without_factory_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError) as info:
        StateDictCodec().load(saved_linear(tmp_path))
    assert "model_factory=" in str(info.value) and "download_model_files" in str(info.value)


@pytest.mark.parametrize(
    ("factory", "mismatch"),
    [
        (lambda: torch.nn.Linear(3, 2), "size mismatch for weight"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 2)), "Missing key(s)"),
    ],
    ids=["shape", "keys"],
)
def test_state_dict_load_into_a_different_model(
    tmp_path: Path, factory: Any, mismatch: str
) -> None:
    source = saved_linear(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        StateDictCodec().load(source, factory)
    message = str(info.value)
    assert str(source) in message and mismatch in message
    assert "torch.nn.modules.linear.Linear" in message  # the class it was saved from
    assert isinstance(info.value.__cause__, RuntimeError)


def test_state_dict_load_of_a_corrupt_file(tmp_path: Path) -> None:
    source = saved_linear(tmp_path)
    (source / StateDictCodec.FILE).write_bytes(b"half-written")
    with pytest.raises(ModelLoadError) as info:
        StateDictCodec().load(source, lambda: torch.nn.Linear(4, 2))
    assert StateDictCodec.FILE in str(info.value)


def test_factory_that_builds_no_module(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError) as info:
        StateDictCodec().load(saved_linear(tmp_path), lambda: "not a model")
    assert "model_factory" in str(info.value) and "str" in str(info.value)


def test_manager_load_errors_name_the_run(tmp_path: Path) -> None:
    mgr = manager(tmp_path, model_format="state_dict", model_factory=lambda: torch.nn.Linear(3, 2))
    mgr.upload_initial_model(torch.nn.Linear(4, 2))
    run_id = mgr.get_initial_model_run_id()
    with pytest.raises(ModelLoadError) as info:
        mgr.download_initial_model()
    assert f"run {run_id}" in str(info.value) and "size mismatch" in str(info.value)

    raw = manager(tmp_path, model_format="state_dict")  # no model_factory
    with pytest.raises(InvalidModelError):
        raw.download_initial_model()
    files = raw.download_model_files(run_id or "", tmp_path / "files")
    state = torch.load(files / StateDictCodec.FILE, weights_only=True)
    assert state["weight"].shape == (2, 4)  # the raw files are still there for the asking
