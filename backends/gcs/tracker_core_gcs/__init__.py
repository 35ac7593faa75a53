"""tracker-core backend for Google Cloud Storage (``gs://bucket/prefix``, ``gcs://bucket/prefix``).

Installing this distribution is all it takes for ``tracker_core.connect("gs://bucket/prefix")``
to work: it registers :class:`GCSBackend` under the ``gs`` and ``gcs`` schemes of the
entry-point group ``tracker_core.backends``. Artifact roots are normalised to ``gs://``, the
only GCS scheme MLflow understands.
"""

from tracker_core_gcs.backend import GCSBackend, TrackerGCSFileSystem, gcs_filesystem, gcs_root_uri
from tracker_core_gcs.credentials import GCSCredentials
from tracker_core_gcs.errors import classify_gcs_error
from tracker_core_gcs.manager import ExperimentsManagerWithGoogleCloudStorageBackend

__all__ = [
    "ExperimentsManagerWithGoogleCloudStorageBackend",
    "GCSBackend",
    "GCSCredentials",
    "TrackerGCSFileSystem",
    "classify_gcs_error",
    "gcs_filesystem",
    "gcs_root_uri",
]
