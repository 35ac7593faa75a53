"""How a torch model becomes files and back.

A codec writes a model into a local directory and reads it back. The format name is
recorded on the run (tag ``tracker.model_format``) so a download always uses the reader that
matches the writer.

- ``state_dict`` (here): ``state_dict.pt`` loaded with ``torch.load(weights_only=True)``; safe
  against pickled code, needs a ``model_factory`` that builds the empty model.
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

from tracker_core.errors import ConfigurationError, ModelNotFoundError

__all__ = ["CODEC_GROUP", "ModelCodec", "StateDictCodec", "available_formats", "get_codec"]

CODEC_GROUP = "tracker_core.codecs"
ModelFactory = Callable[[], Any]


class ModelCodec(abc.ABC):
    """Writes a model into a directory and reads it back."""

    name: str

    @abc.abstractmethod
    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        """Write ``model`` into the (existing, empty) ``directory``."""

    @abc.abstractmethod
    def load(self, directory: Path, model_factory: ModelFactory | None = None) -> Any:
        """Read the model written by :meth:`save`."""


class StateDictCodec(ModelCodec):
    """Weights only: ``torch.save(model.state_dict())``, read back with ``weights_only=True``."""

    name = "state_dict"
    FILE = "state_dict.pt"
    META = "tracker_model.json"

    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        import torch

        if not hasattr(model, "state_dict"):
            raise ConfigurationError(
                f"the state_dict format needs a torch.nn.Module, got {type(model).__name__}"
            )
        torch.save(model.state_dict(), directory / self.FILE)
        meta = {
            "format": self.name,
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
        }
        (directory / self.META).write_text(json.dumps(meta))

    def load(self, directory: Path, model_factory: ModelFactory | None = None) -> Any:
        import torch

        path = directory / self.FILE
        if not path.exists():
            raise ModelNotFoundError(f"no {self.FILE} in {directory}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if model_factory is None:
            return state  # the raw state dict: the caller builds the model
        model = model_factory()
        model.load_state_dict(state)
        return model


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
