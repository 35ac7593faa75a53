"""``ExperimentsManagerWithGoogleCloudStorageBackend``: the S3 seed class's GCS counterpart."""

from __future__ import annotations

from tracker_core.bucket_manager import DEFAULT_PREFIX, BucketExperimentsManager
from tracker_core_gcs.credentials import GCSCredentials

__all__ = ["DEFAULT_PREFIX", "ExperimentsManagerWithGoogleCloudStorageBackend"]


class ExperimentsManagerWithGoogleCloudStorageBackend(BucketExperimentsManager):
    """An :class:`~tracker_core.ExperimentsManager` whose models live in a GCS bucket.

    ``ExperimentsManagerWithGoogleCloudStorageBackend(tracking_uri, gcs_credentials,
    main_metric, plugin_name, ...)``, as the S3 seed class: models go to
    ``gs://<bucket_name>/<prefix>`` (``prefix`` defaults to ``"mlflow"``), read and written
    with ``gcs_credentials`` (:class:`GCSCredentials`). Deleting a model removes its objects
    with GCS batch requests (100 deletions each, gcsfs's ``rm``), then lists the prefix again.
    See :class:`~tracker_core.bucket_manager.BucketExperimentsManager`.
    """

    scheme = "gs"
    credentials_type = GCSCredentials
    credentials_arg = "gcs_credentials"

    @property
    def gcs_credentials(self) -> GCSCredentials:
        assert isinstance(self.credentials, GCSCredentials)
        return self.credentials
