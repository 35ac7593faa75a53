"""tracker-core: fine-tuning iterations tracked in MLflow, best models kept in object storage."""

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.codecs import ModelCodec, StateDictCodec
from tracker_core.connect import connect
from tracker_core.errors import (
    ArtifactStoreError,
    BackendNotInstalledError,
    CleanupRefusedError,
    ConfigurationError,
    InvalidArgumentError,
    InvalidMetricError,
    InvalidModelError,
    InvalidNameError,
    InvalidParamsError,
    IterationFailedError,
    IterationInUseError,
    LeaseLostError,
    MaxAttemptsReachedException,
    ModelFilesMissingError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotSavedError,
    NoActiveIterationError,
    NoActiveRunError,
    NoModelToKeepError,
    RunInUseError,
    RunNotFoundError,
    TrackerError,
    TrackingStoreError,
    TransientError,
    UnknownSchemeError,
)
from tracker_core.finetune import IterationResult, RunResult, run_iteration
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod, connect_kwargs, load_method
from tracker_core.params import FineTuningParams
from tracker_core.reconcile import OrphanedModel, OrphanScan
from tracker_core.registry import Backend, available_schemes, register_backend
from tracker_core.retry import RetryConfig, RetryParams
from tracker_core.stores import ArtifactStore, TrackingStore
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
    MetricValue,
    RunRecord,
    RunStatus,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactStore",
    "ArtifactStoreError",
    "Backend",
    "BackendNotInstalledError",
    "CleanupRefusedError",
    "ConfigurationError",
    "ExperimentRecord",
    "ExperimentsManager",
    "FineTuningIteration",
    "FineTuningMethod",
    "FineTuningParams",
    "InvalidArgumentError",
    "InvalidMetricError",
    "InvalidModelError",
    "InvalidNameError",
    "InvalidParamsError",
    "IterationFailedError",
    "IterationInUseError",
    "IterationResult",
    "LeaseLostError",
    "MaxAttemptsReachedException",
    "MetricValue",
    "MetricsAccumulator",
    "ModelCodec",
    "ModelFilesMissingError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotSavedError",
    "NoActiveIterationError",
    "NoActiveRunError",
    "NoModelToKeepError",
    "OrphanScan",
    "OrphanedModel",
    "RetryConfig",
    "RetryParams",
    "RunInUseError",
    "RunNotFoundError",
    "RunRecord",
    "RunResult",
    "RunStatus",
    "StateDictCodec",
    "TrackerError",
    "TrackingStore",
    "TrackingStoreError",
    "TransientError",
    "UnknownSchemeError",
    "available_schemes",
    "connect",
    "connect_kwargs",
    "load_method",
    "register_backend",
    "run_iteration",
]
