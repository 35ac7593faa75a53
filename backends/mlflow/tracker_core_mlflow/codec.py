"""The ``mlflow.pytorch`` model format: MLflow's own PyTorch flavour.

A model written by :class:`MlflowPytorchCodec` under a run's artifact URI
(``<artifact_uri>/model``) is loadable with ``mlflow.pytorch.load_model("runs:/<id>/model")``.

Security: this format **pickles the whole model object**, code references included, and
loading it unpickles - only load models from a store you trust. The ``state_dict`` format of
the core stores weights only and loads with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracker_core.codecs import ModelCodec, ModelFactory
from tracker_core.errors import ConfigurationError, ModelNotFoundError

__all__ = ["MlflowPytorchCodec", "default_requirements"]

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _project(requirement: str) -> str:
    match = _NAME.match(requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement


def default_requirements(extra: Sequence[str] | None = None) -> list[str]:
    """``torch==<installed version>`` (local label such as ``+cpu`` dropped, as MLflow's own
    inference does) followed by ``extra``; an explicit torch requirement in ``extra`` wins."""
    import torch

    extra = list(extra or ())
    version = str(torch.__version__).split("+", 1)[0]
    if any(_project(r) == "torch" for r in extra):
        return list(dict.fromkeys(extra))
    return list(dict.fromkeys([f"torch=={version}", *extra]))


class MlflowPytorchCodec(ModelCodec):
    """``mlflow.pytorch.save_model`` / ``load_model`` with explicit pip requirements, so MLflow
    never runs its slow requirement inference (which imports the model in a subprocess)."""

    name = "mlflow.pytorch"

    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        """Write ``model`` into the existing, empty ``directory`` (MLflow wants to create it)."""
        import mlflow.pytorch

        directory = Path(directory)
        if directory.exists():
            if any(directory.iterdir()):
                raise ConfigurationError(f"model directory {directory} is not empty")
            directory.rmdir()
        kwargs: dict[str, Any] = {"pip_requirements": default_requirements(requirements)}
        if "serialization_format" in inspect.signature(mlflow.pytorch.save_model).parameters:
            # MLflow >= 3.5 defaults to "pt2", which needs an input example (and picks its
            # default from the global tracking URI); keep the portable pickle format.
            kwargs["serialization_format"] = "pickle"
        try:
            mlflow.pytorch.save_model(model, str(directory), **kwargs)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            directory.mkdir(parents=True, exist_ok=True)

    def load(self, directory: Path, model_factory: ModelFactory | None = None) -> Any:
        """Unpickle the model MLflow saved; ``model_factory`` is not needed and ignored."""
        import mlflow.pytorch

        if not (Path(directory) / "MLmodel").is_file():
            raise ModelNotFoundError(f"no MLflow model (MLmodel file) in {directory}")
        return mlflow.pytorch.load_model(str(directory))
