"""tracker-core backend for Amazon S3 and S3-compatible stores (``s3://bucket/prefix``).

Installing this distribution is all it takes for ``tracker_core.connect("s3://bucket/prefix")``
to work: it registers :class:`S3Backend` under the ``s3`` scheme of the entry-point group
``tracker_core.backends``. The seed API's :class:`ExperimentsManagerWithAmazonS3Backend` and
:class:`S3Credentials` live here too.
"""

from tracker_core_s3.backend import S3Backend, TrackerS3FileSystem, s3_filesystem, s3_root_uri
from tracker_core_s3.credentials import S3Credentials
from tracker_core_s3.errors import classify_s3_error
from tracker_core_s3.manager import ExperimentsManagerWithAmazonS3Backend
from tracker_core_s3.store import S3ArtifactStore

__all__ = [
    "ExperimentsManagerWithAmazonS3Backend",
    "S3ArtifactStore",
    "S3Backend",
    "S3Credentials",
    "TrackerS3FileSystem",
    "classify_s3_error",
    "s3_filesystem",
    "s3_root_uri",
]
