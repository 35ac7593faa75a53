"""tracker-core backend for a local folder (``file://`` URIs and plain paths)."""

from tracker_core_local.backend import LocalBackend, local_root_uri

__all__ = ["LocalBackend", "local_root_uri"]
