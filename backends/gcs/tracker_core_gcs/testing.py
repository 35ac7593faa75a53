"""The GCS leg of tracker-core's behaviour-suite matrix (a GCS emulator).

In a ``conftest.py``::

    from tracker_core.testing.servers import gcs_emulator
    from tracker_core_gcs.testing import make_gcs_backend_under_test

    @pytest.fixture(scope="session")
    def gcs_endpoint():
        with gcs_emulator() as url:
            yield url

    # in the `backend` fixture's "gcs" branch:
    yield make_gcs_backend_under_test(gcs_endpoint, tracking_uri)

No ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` setting is needed: the backend never uses gcsfs's
experimental filesystem.
"""

from __future__ import annotations

import uuid

from tracker_core.testing.harness import BackendUnderTest
from tracker_core_gcs.backend import gcs_filesystem

__all__ = ["make_gcs_backend_under_test"]


def make_gcs_backend_under_test(
    endpoint: str, tracking_uri: str, *, bucket: str | None = None, project: str = "test"
) -> BackendUnderTest:
    """A fresh bucket (created now) on the emulator at ``endpoint``, models under
    ``gs://<bucket>/models``, anonymous access. ``env`` points MLflow's GCS artifact
    repository (google-cloud-storage) at the emulator (capability ``"mlflow"``)."""
    bucket = bucket or f"suite-{uuid.uuid4().hex[:12]}"
    options = {"endpoint_url": endpoint, "token": "anon", "project": project}
    gcs_filesystem(options).mkdir(bucket)
    return BackendUnderTest(
        "gcs",
        artifact_root=f"gs://{bucket}/models",
        tracking_uri=tracking_uri,
        storage_options=options,
        env={"STORAGE_EMULATOR_HOST": endpoint, "GOOGLE_CLOUD_PROJECT": project},
        capabilities=frozenset({"mlflow"}),
    )
