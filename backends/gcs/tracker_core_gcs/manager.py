"""``ExperimentsManagerWithGoogleCloudStorageBackend``: the S3 seed class's GCS counterpart."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.errors import ConfigurationError
from tracker_core.manager import ExperimentsManager
from tracker_core.retry import RetryConfig
from tracker_core_gcs.credentials import GCSCredentials

__all__ = ["DEFAULT_PREFIX", "ExperimentsManagerWithGoogleCloudStorageBackend"]

log = logging.getLogger(__name__)

#: folder of the bucket under which experiments get their artifact locations
DEFAULT_PREFIX = "mlflow"


class ExperimentsManagerWithGoogleCloudStorageBackend(ExperimentsManager):
    """An :class:`~tracker_core.ExperimentsManager` whose models live in a GCS bucket.

    Models go to ``gs://<bucket_name>/<prefix>`` (``prefix`` defaults to ``"mlflow"``), read
    and written with ``gcs_credentials``; runs are tracked at ``tracking_uri`` (default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). Other keyword arguments are
    those of ``ExperimentsManager``; ``storage_options`` are merged over the credentials' own.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        gcs_credentials: GCSCredentials,
        main_metric: str,
        plugin_name: str,
        accumulators: Iterable[MetricsAccumulator] = (),
        is_loss: bool = False,
        n_top_runs: int = 10,
        requirements: Sequence[str] | None = None,
        retry_config: RetryConfig | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(gcs_credentials, GCSCredentials):
            raise ConfigurationError(
                f"gcs_credentials must be GCSCredentials, got {type(gcs_credentials).__name__}"
            )
        if not gcs_credentials.bucket_name:
            raise ConfigurationError("GCSCredentials.bucket_name is empty")
        self.gcs_credentials = gcs_credentials
        self.artifact_uri = f"gs://{gcs_credentials.bucket_name}/{prefix.strip('/')}".rstrip("/")
        options = {**gcs_credentials.storage_options(), **dict(storage_options or {})}
        super().__init__(
            tracking_uri,
            main_metric,
            plugin_name,
            accumulators,
            is_loss,
            n_top_runs,
            requirements,
            retry_config,
            artifact_uri=self.artifact_uri,
            storage_options=options,
            **kwargs,
        )

    def _delete_model(self, run_id: str, experiment_id: str) -> bool:
        """Delete every object of the run's model through the GCS API; True when none is left.

        The model's prefix is listed and its objects removed with GCS batch requests (100
        deletions each, gcsfs's ``rm``), under the ``delete_model`` retry policy; then the
        prefix is listed again, and the answer is True only if nothing remains.
        ``experiment_id`` is not needed (the run's artifact URI locates the model) and is
        kept for the seed's signature.
        """
        deleted = super()._delete_model(run_id, experiment_id)
        log.debug("GCS model objects of run %s %s", run_id, "deleted" if deleted else "remain")
        return deleted
