"""The S3 leg of tracker-core's behaviour-suite matrix (moto's server, or any S3 endpoint).

In a ``conftest.py``::

    from tracker_core.testing.servers import moto_server
    from tracker_core_s3.testing import make_s3_backend_under_test

    @pytest.fixture(scope="session")
    def s3_endpoint():
        with moto_server() as url:
            yield url

    # in the `backend` fixture's "s3" branch:
    yield make_s3_backend_under_test(s3_endpoint, tracking_uri)
"""

from __future__ import annotations

import uuid

from tracker_core.testing.harness import BackendUnderTest
from tracker_core_s3.backend import s3_filesystem

__all__ = ["MOTO_CREDENTIALS", "make_s3_backend_under_test"]

#: any credentials do for moto (it checks none unless told to)
MOTO_CREDENTIALS = {"key": "testing", "secret": "testing"}


def make_s3_backend_under_test(
    endpoint: str,
    tracking_uri: str,
    *,
    bucket: str | None = None,
    key: str = MOTO_CREDENTIALS["key"],
    secret: str = MOTO_CREDENTIALS["secret"],
) -> BackendUnderTest:
    """A fresh bucket (created now) on ``endpoint``, models under ``s3://<bucket>/models``.

    The credentials go in ``storage_options`` (so worker processes get them too) and, with
    ``MLFLOW_S3_ENDPOINT_URL``, in ``env`` for plain-MLflow reads (capability ``"mlflow"``).
    Capability ``"multipart"``: a killed upload leaves an incomplete multipart upload.
    """
    bucket = bucket or f"suite-{uuid.uuid4().hex[:12]}"
    options = {"endpoint_url": endpoint, "key": key, "secret": secret}
    s3_filesystem(options).mkdir(bucket)
    return BackendUnderTest(
        "s3",
        artifact_root=f"s3://{bucket}/models",
        tracking_uri=tracking_uri,
        storage_options=options,
        env={
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_EC2_METADATA_DISABLED": "true",
        },
        capabilities=frozenset({"mlflow", "multipart"}),
    )
