"""The seed's storage-specific managers, written once: models in a bucket given by credentials.

``ExperimentsManagerWithAmazonS3Backend`` (``tracker-core-s3``) and its GCS counterpart
(``tracker-core-gcs``) are :class:`BucketExperimentsManager` subclasses that only name their
URI scheme, their credentials class and the seed's keyword for the credentials
(``s3_credentials=``, ``gcs_credentials=``). Everything else - checking the credentials,
building ``<scheme>://<bucket>/<prefix>``, merging ``storage_options`` - is here.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Protocol, runtime_checkable

from tracker_core import arguments
from tracker_core.errors import ConfigurationError
from tracker_core.manager import ExperimentsManager

__all__ = ["DEFAULT_PREFIX", "BucketCredentials", "BucketExperimentsManager"]

log = logging.getLogger(__name__)

#: folder of the bucket under which experiments get their artifact locations
DEFAULT_PREFIX = "mlflow"


@runtime_checkable
class BucketCredentials(Protocol):
    """What a backend's credentials value offers: a bucket, and fsspec storage options."""

    @property
    def bucket_name(self) -> str: ...

    def storage_options(self) -> dict[str, Any]: ...


class BucketExperimentsManager(ExperimentsManager):
    """An :class:`~tracker_core.ExperimentsManager` whose models live in a bucket.

    Called as the seed's classes are: ``(tracking_uri, credentials, main_metric, plugin_name,
    accumulators=(), is_loss=False, n_top_runs=10, requirements=None, retry_config=None)``,
    the credentials positionally or by their keyword (:attr:`credentials_arg`). Models go to
    ``<scheme>://<bucket_name>/<prefix>`` (``prefix`` defaults to ``"mlflow"``), read and
    written with the credentials; ``storage_options`` are merged over the credentials' own.
    Other keyword arguments are those of ``ExperimentsManager``.
    """

    #: the URI scheme of the bucket (``"s3"``, ``"gs"``)
    scheme: ClassVar[str]
    #: the credentials class the seed's constructor takes
    credentials_type: ClassVar[type]
    #: the seed's keyword for the credentials (``"s3_credentials"``)
    credentials_arg: ClassVar[str]

    def __init__(
        self,
        tracking_uri: str | None,
        *args: Any,
        prefix: str = DEFAULT_PREFIX,
        storage_options: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.credentials_arg in kwargs:
            credentials = kwargs.pop(self.credentials_arg)
        elif args:
            credentials, args = args[0], args[1:]
        else:
            raise ConfigurationError(f"{type(self).__name__} needs {self.credentials_arg}=")
        if not isinstance(credentials, self.credentials_type):  # a BucketCredentials
            raise ConfigurationError(
                f"{self.credentials_arg} must be {self.credentials_type.__name__}, "
                f"got {type(credentials).__name__}"
            )
        assert isinstance(credentials, BucketCredentials)
        if not credentials.bucket_name:
            raise ConfigurationError(f"{self.credentials_type.__name__}.bucket_name is empty")
        if not isinstance(prefix, str) or not prefix.isprintable():
            arguments.refuse("prefix", prefix, "a folder of the bucket (text, may be empty)")
        self.credentials: BucketCredentials = credentials
        self.artifact_uri = f"{self.scheme}://{credentials.bucket_name}/{prefix.strip('/')}"
        self.artifact_uri = self.artifact_uri.rstrip("/")
        options = {**credentials.storage_options(), **dict(storage_options or {})}
        super().__init__(
            tracking_uri,
            *args,
            artifact_uri=self.artifact_uri,
            storage_options=options,
            **kwargs,
        )

    def _delete_model(self, run_id: str, experiment_id: str) -> bool:
        """Delete every object of the run's model through the store's API; True when none is
        left. ``experiment_id`` is kept for the seed's signature (the run's artifact URI
        locates the model)."""
        deleted = super()._delete_model(run_id, experiment_id)
        log.debug(
            "%s objects of run %s %s", self.scheme, run_id, "deleted" if deleted else "remain"
        )
        return deleted
