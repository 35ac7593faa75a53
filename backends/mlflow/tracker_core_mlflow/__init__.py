"""MLflow for tracker-core: the tracking store, the ``mlflow.pytorch`` model format, the
shared base of the MLflow-tracked backends and the seed API's ``MLflowClientWrapper``."""

from tracker_core_mlflow.backend import DEFAULT_TRACKING_URI, MlflowBackend, default_tracking_uri
from tracker_core_mlflow.codec import MlflowPytorchCodec
from tracker_core_mlflow.errors import TransientTrackingStoreError, classify_mlflow_error
from tracker_core_mlflow.tracking import MlflowTrackingStore
from tracker_core_mlflow.wrapper import MLflowClientWrapper

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLflowClientWrapper",
    "MlflowBackend",
    "MlflowPytorchCodec",
    "MlflowTrackingStore",
    "TransientTrackingStoreError",
    "classify_mlflow_error",
    "default_tracking_uri",
]
