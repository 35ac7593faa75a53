"""``ExperimentsManagerWithAmazonS3Backend``: the seed API's S3 manager."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.errors import ConfigurationError
from tracker_core.manager import ExperimentsManager
from tracker_core.retry import RetryConfig
from tracker_core_s3.credentials import S3Credentials

__all__ = ["DEFAULT_PREFIX", "ExperimentsManagerWithAmazonS3Backend"]

log = logging.getLogger(__name__)

#: folder of the bucket under which experiments get their artifact locations
DEFAULT_PREFIX = "mlflow"


class ExperimentsManagerWithAmazonS3Backend(ExperimentsManager):
    """An :class:`~tracker_core.ExperimentsManager` whose models live in an S3 bucket.

    Models go to ``s3://<bucket_name>/<prefix>`` (``prefix`` defaults to ``"mlflow"``), read
    and written with ``s3_credentials``; runs are tracked at ``tracking_uri`` (default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). Other keyword arguments
    (``keep``, ``model_format``, ``storage_options``...) are those of ``ExperimentsManager``;
    ``storage_options`` are merged over the credentials' own.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        s3_credentials: S3Credentials,
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
        if not isinstance(s3_credentials, S3Credentials):
            raise ConfigurationError(
                f"s3_credentials must be S3Credentials, got {type(s3_credentials).__name__}"
            )
        if not s3_credentials.bucket_name:
            raise ConfigurationError("S3Credentials.bucket_name is empty")
        self.s3_credentials = s3_credentials
        self.artifact_uri = f"s3://{s3_credentials.bucket_name}/{prefix.strip('/')}".rstrip("/")
        options = {**s3_credentials.storage_options(), **dict(storage_options or {})}
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
        """Delete every object of the run's model through the S3 API; True when none is left.

        The model's prefix is listed and its keys removed with ``DeleteObjects`` in batches
        of at most 1,000 (S3's limit per request; s3fs's ``rm`` does the batching), under the
        ``delete_model`` retry policy; then the prefix is listed again, and the answer is
        True only if nothing remains (``DeleteObjects`` reports per-key failures without
        failing the request). ``experiment_id`` is not needed (the run's artifact URI locates
        the model) and is kept for the seed's signature.
        """
        deleted = super()._delete_model(run_id, experiment_id)
        log.debug("S3 model objects of run %s %s", run_id, "deleted" if deleted else "remain")
        return deleted
