"""Shared base of the shipped backends: MLflow tracking, artifact side left to subclasses."""

from __future__ import annotations

import os

from tracker_core.registry import Backend
from tracker_core.retry import Retrier
from tracker_core.stores import TrackingStore
from tracker_core_mlflow.tracking import MlflowTrackingStore

__all__ = ["DEFAULT_TRACKING_URI", "MlflowBackend", "default_tracking_uri"]

#: MLflow's own default tracking URI (relative to the working directory)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set and non-empty, else ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MlflowBackend(Backend):
    """A backend whose tracking side is MLflow; subclasses implement ``artifact_store``.

    Models default to the ``mlflow.pytorch`` format so the MLflow UI and
    ``mlflow.pytorch.load_model("runs:/<id>/model")`` understand them.
    """

    default_model_format = "mlflow.pytorch"

    def tracking_store(self, tracking_uri: str, *, retrier: Retrier) -> TrackingStore:
        """An :class:`MlflowTrackingStore`; it does not retry (the caller uses ``retrier``)."""
        return MlflowTrackingStore(tracking_uri)
