"""``ExperimentsManagerWithAmazonS3Backend``: the seed API's S3 manager."""

from __future__ import annotations

from tracker_core.bucket_manager import DEFAULT_PREFIX, BucketExperimentsManager
from tracker_core_s3.credentials import S3Credentials

__all__ = ["DEFAULT_PREFIX", "ExperimentsManagerWithAmazonS3Backend"]


class ExperimentsManagerWithAmazonS3Backend(BucketExperimentsManager):
    """An :class:`~tracker_core.ExperimentsManager` whose models live in an S3 bucket.

    ``ExperimentsManagerWithAmazonS3Backend(tracking_uri, s3_credentials, main_metric,
    plugin_name, accumulators=(), is_loss=False, n_top_runs=10, requirements=None,
    retry_config=None, *, prefix="mlflow", storage_options=None, **kwargs)``: models go to
    ``s3://<bucket_name>/<prefix>``, read and written with ``s3_credentials``
    (:class:`S3Credentials`); runs are tracked at ``tracking_uri`` (default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). Other keyword arguments (``keep``,
    ``model_format``...) are those of ``ExperimentsManager``; ``storage_options`` (s3fs's) are
    merged over the credentials' own (see
    :class:`~tracker_core.bucket_manager.BucketExperimentsManager`).
    """

    scheme = "s3"
    credentials_type = S3Credentials
    credentials_arg = "s3_credentials"

    @property
    def s3_credentials(self) -> S3Credentials:
        assert isinstance(self.credentials, S3Credentials)
        return self.credentials

    def _delete_model(self, run_id: str, experiment_id: str) -> bool:
        """Delete every object of the run's model through the S3 API; True when none is left.

        The model's prefix is listed and its keys removed with ``DeleteObjects`` in batches
        of at most 1,000 (S3's limit per request; s3fs's ``rm`` does the batching), under the
        ``delete_model`` retry policy; then the prefix is listed again, and the answer is
        True only if nothing remains (``DeleteObjects`` reports per-key failures without
        failing the request). ``experiment_id`` is kept for the seed's signature.
        """
        return super()._delete_model(run_id, experiment_id)
