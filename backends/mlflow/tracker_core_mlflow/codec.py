"""The ``mlflow.pytorch`` model format: MLflow's own PyTorch flavour.

A model written by :class:`MlflowPytorchCodec` under a run's artifact URI
(``<artifact_uri>/model``) is loadable with ``mlflow.pytorch.load_model("runs:/<id>/model")``.

Security: this format **pickles the whole model object**, code references included, and
loading it unpickles - only load models from a store you trust. The ``state_dict`` format of
the core stores weights only and loads with ``weights_only=True``. tracker-core says so once
per process (at INFO, on the first save) instead of MLflow's WARNING on every save; the task
service's training processes hand the line to their worker, which says it once.

Importing ``mlflow.pytorch`` runs ``logging.basicConfig(level=logging.ERROR)`` (in
``mlflow/pytorch/_lightning_autolog.py``, imported at the end of ``mlflow/pytorch/__init__.py``
even without Lightning installed), which installs a stderr handler on the root logger and
silences the user's INFO/WARNING logs. The codec imports it with the root logger kept as it was.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tracker_core.codecs import ModelCodec, ModelFactory, describe_type
from tracker_core.errors import ConfigurationError, InvalidModelError, ModelNotFoundError
from tracker_core_mlflow.quiet import quiet, root_logger_kept

__all__ = ["MlflowPytorchCodec", "default_requirements", "import_mlflow_pytorch"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_import_lock = threading.Lock()
_imported = threading.Event()
_explained = threading.Event()
#: the start of MLflow's WARNING on every pickle-format save (``mlflow.pytorch.save_model``)
PICKLE_WARNING = "Saving pytorch model by Pickle"


def import_mlflow_pytorch() -> ModuleType:
    """``mlflow.pytorch``, imported without changing the root logger's level or handlers."""
    if not _imported.is_set():
        with _import_lock, root_logger_kept():
            importlib.import_module("mlflow.pytorch")
            _imported.set()
    return importlib.import_module("mlflow.pytorch")


def _is_pickle_warning(record: logging.LogRecord) -> bool:
    return record.levelno == logging.WARNING and record.getMessage().startswith(PICKLE_WARNING)


def _explain_once() -> None:
    with _import_lock:
        if _explained.is_set():
            return
        _explained.set()
    log.info(
        "model format 'mlflow.pytorch' pickles the whole model: loading it can run code "
        "from the store, so load only from stores you trust; model_format='state_dict' "
        "stores weights only",
        extra={"tracker_core_once": True},  # a task service says it once per worker
    )


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
        """Write ``model`` into the existing, empty ``directory`` (MLflow wants to create it).

        Raises:
            InvalidModelError: ``model`` is not a ``torch.nn.Module``.
        """
        import torch

        if not isinstance(model, torch.nn.Module):
            raise InvalidModelError(
                f"the {self.name} model format saves a torch.nn.Module, got "
                f"{describe_type(model)}; pass the model itself, or choose another model_format"
            )
        mlflow_pytorch = import_mlflow_pytorch()
        directory = Path(directory)
        if directory.exists():
            if any(directory.iterdir()):
                raise ConfigurationError(f"model directory {directory} is not empty")
            directory.rmdir()
        kwargs: dict[str, Any] = {"pip_requirements": default_requirements(requirements)}
        if "serialization_format" in inspect.signature(mlflow_pytorch.save_model).parameters:
            # MLflow >= 3.5 defaults to "pt2", which needs an input example (and picks its
            # default from the global tracking URI); keep the portable pickle format.
            kwargs["serialization_format"] = "pickle"
        _explain_once()
        try:
            with (
                quiet(mlflow_pytorch.__name__, _is_pickle_warning),
                quiet(_REQUIREMENTS_LOGGER, _requirements_mismatch),
            ):
                mlflow_pytorch.save_model(model, str(directory), **kwargs)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            directory.mkdir(parents=True, exist_ok=True)

    def load(self, directory: Path, model_factory: ModelFactory | None = None) -> Any:
        """Unpickle the model MLflow saved; ``model_factory`` is not needed and ignored."""
        if not (Path(directory) / "MLmodel").is_file():
            raise ModelNotFoundError(f"no MLflow model (MLmodel file) in {directory}")
        with quiet(_REQUIREMENTS_LOGGER, _requirements_mismatch):
            return import_mlflow_pytorch().load_model(str(directory))


#: where MLflow warns that a model's recorded requirements differ from this environment
_REQUIREMENTS_LOGGER = "mlflow.utils.requirements_utils"
_mismatches_seen: set[str] = set()
_seen_lock = threading.Lock()


def _requirements_mismatch(record: logging.LogRecord) -> bool:
    """MLflow's 4-line WARNING, when a model is saved or loaded, that its ``requirements=``
    differ from this environment: kept out of the user's output, and told once per
    distinct text at DEBUG through tracker-core's logger."""
    message = record.getMessage()
    if not message.startswith("Detected one or more mismatches"):
        return False
    with _seen_lock:
        first = message not in _mismatches_seen
        _mismatches_seen.add(message)
    if first:
        log.debug("model requirements: %s", message)
    return True
