"""How a torch model becomes files and back.

A codec writes a model into a local directory and reads it back. The format name is
recorded on the run (tag ``tracker.model_format``) so a download always uses the reader that
matches the writer.

- ``state_dict`` (here): ``state_dict.pt`` loaded with ``torch.load(weights_only=True)``; safe
  against pickled code, needs a ``model_factory`` that builds the empty model (without one,
  loading raises :class:`~tracker_core.errors.InvalidModelError`; the manager's
  ``download_model_files`` copies the raw files).
- ``mlflow.pytorch`` (in ``tracker-core-mlflow``): MLflow's own format, loadable with
  ``mlflow.pytorch.load_model("runs:/<id>/model")``.

Third-party codecs register in the entry-point group ``tracker_core.codecs``.
"""

from __future__ import annotations

import abc
import importlib.metadata
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tracker_core.errors import (
    ConfigurationError,
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
)

__all__ = [
    "CODEC_GROUP",
    "ModelCodec",
    "StateDictCodec",
    "available_formats",
    "describe_type",
    "get_codec",
]

CODEC_GROUP = "tracker_core.codecs"
ModelFactory = Callable[[], Any]


def describe_type(obj: object) -> str:
    """``module.QualName`` of ``obj``'s type, for error messages."""
    kind = type(obj)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


class ModelCodec(abc.ABC):
    """Writes a model into a directory and reads it back."""

    name: str

    @abc.abstractmethod
    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        """Write ``model`` into the (existing, empty) ``directory``.

        Raises:
            InvalidModelError: the format cannot save ``model`` (wrong type).
        """

    @abc.abstractmethod
    def load(self, directory: Path, model_factory: ModelFactory | None = None) -> Any:
        """Read the model written by :meth:`save`.

        Raises:
            ModelNotFoundError: ``directory`` holds no model of this format.
            InvalidModelError: the format needs a ``model_factory`` and none was given.
            ModelLoadError: the files do not fit the model ``model_factory`` builds, or are
                corrupt.
        """


class StateDictCodec(ModelCodec):
    """Weights only: ``torch.save(model.state_dict())``, read back with ``weights_only=True``."""

    name = "state_dict"
    FILE = "state_dict.pt"
    META = "tracker_model.json"

    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        import torch

        if not isinstance(model, torch.nn.Module):
            hint = " (pass the module, not its state_dict())" if isinstance(model, dict) else ""
            raise InvalidModelError(
                f"the {self.name} model format saves the weights of a torch.nn.Module, got "
                f"{describe_type(model)}{hint}"
            )
        torch.save(model.state_dict(), directory / self.FILE)
        meta = {"format": self.name, "class": describe_type(model)}
        (directory / self.META).write_text(json.dumps(meta))

    def load(self, directory: Path, model_factory: ModelFactory | None = None) -> Any:
        """Build the model with ``model_factory`` and load the stored weights into it."""
        import torch

        path = directory / self.FILE
        if not path.exists():
            raise ModelNotFoundError(f"no {self.FILE} in {directory}")
        if model_factory is None:
            raise InvalidModelError(
                f"the {self.name} model format stores weights only: pass model_factory= (a "
                "callable that builds the empty model) to connect() to load it, or use "
                "download_model_files() to get the raw files"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a truncated or foreign file
            raise ModelLoadError(
                f"{path} is not a readable state dict: {type(exc).__name__}: {exc}"
            ) from exc
        model = model_factory()
        if not hasattr(model, "load_state_dict"):
            raise InvalidModelError(
                f"model_factory must build a torch.nn.Module to load a {self.name} model "
                f"into, it built {describe_type(model)}"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"the weights in {directory}{self._saved_from(directory)} do not fit the "
                f"{describe_type(model)} that model_factory builds: {exc}"
            ) from exc
        return model

    def _saved_from(self, directory: Path) -> str:
        try:
            saved = json.loads((directory / self.META).read_text()).get("class")
        except (OSError, ValueError, AttributeError):
            return ""
        return f" (saved from a {saved})" if saved else ""


_lock = threading.Lock()
_codecs: dict[str, ModelCodec] = {}


def available_formats() -> list[str]:
    names = {ep.name for ep in importlib.metadata.entry_points(group=CODEC_GROUP)}
    return sorted(names | set(_codecs))


def get_codec(name: str) -> ModelCodec:
    """The codec for format ``name``, loaded from its entry point on first use."""
    with _lock:
        codec = _codecs.get(name)
        if codec is None:
            eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=CODEC_GROUP)}
            if name not in eps:
                raise ConfigurationError(
                    f"unknown model format {name!r}; installed formats: {', '.join(sorted(eps))}"
                )
            codec = eps[name].load()()
            _codecs[name] = codec
        return codec
