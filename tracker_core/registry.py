"""Backend discovery: the scheme of an artifact URI picks the backend.

Backends are separate distributions that declare an entry point in the group
``tracker_core.backends`` whose name is the URI scheme and whose object is a
:class:`Backend` subclass (or factory). Entry points are read as strings and loaded on first
use, so a broken plug-in never breaks ``import tracker_core``; its error appears when its
scheme is used.

:data:`KNOWN_BACKENDS` is data, as in fsspec's registry: for each scheme the project knows,
the distribution to install. An unknown scheme raises
:class:`~tracker_core.errors.UnknownSchemeError` listing the installed schemes.
"""

from __future__ import annotations

import abc
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from tracker_core.errors import BackendNotInstalledError, ConfigurationError, UnknownSchemeError
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore, TrackingStore

__all__ = [
    "BACKEND_GROUP",
    "KNOWN_BACKENDS",
    "Backend",
    "available_schemes",
    "get_backend",
    "import_object",
    "register_backend",
    "scheme_of",
]

log = logging.getLogger(__name__)

BACKEND_GROUP = "tracker_core.backends"

#: Schemes the project knows, and the distribution that serves each.
KNOWN_BACKENDS: dict[str, dict[str, str]] = {
    "file": {"dist": "tracker-core-local", "err": "Install tracker-core-local for local folders"},
    "gcs": {"dist": "tracker-core-gcs", "err": "Install tracker-core-gcs to store models on GCS"},
    "gs": {"dist": "tracker-core-gcs", "err": "Install tracker-core-gcs to store models on GCS"},
    "s3": {"dist": "tracker-core-s3", "err": "Install tracker-core-s3 to store models on S3"},
}


class Backend(abc.ABC):
    """A storage backend: builds the two stores for an artifact URI and a tracking URI.

    The shipped backends share the MLflow tracking store and differ only in
    :meth:`artifact_store`.
    """

    #: codec used by ``save_model`` when the user names none
    default_model_format: str = "state_dict"

    @abc.abstractmethod
    def artifact_store(
        self, artifact_uri: str, *, storage_options: Mapping[str, Any] | None, retrier: Retrier
    ) -> ArtifactStore:
        """The artifact store rooted at ``artifact_uri``. No I/O beyond what validation needs."""

    @abc.abstractmethod
    def tracking_store(self, tracking_uri: str, *, retrier: Retrier) -> TrackingStore:
        """The tracking store for ``tracking_uri``."""


BackendFactory = Callable[[], Backend]

_lock = threading.Lock()
_registered: dict[str, BackendFactory | str] = {}
_loaded: dict[str, Backend] = {}


def scheme_of(uri: str) -> str:
    """``s3://b/p`` -> ``s3``; a plain path (or a Windows drive) -> ``file``."""
    if not isinstance(uri, str) or not uri:
        raise ConfigurationError(f"artifact URI must be a non-empty string, got {uri!r}")
    scheme = urlsplit(uri).scheme.lower()
    return scheme if len(scheme) > 1 else "file"


def register_backend(scheme: str, backend: BackendFactory | str, *, clobber: bool = False) -> None:
    """Register a backend for ``scheme`` at run time: a factory, or a ``"module:attr"`` string."""
    with _lock:
        if scheme in _registered and not clobber:
            raise ConfigurationError(f"a backend is already registered for scheme {scheme!r}")
        _registered[scheme] = backend
        _loaded.pop(scheme, None)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=BACKEND_GROUP)}


def available_schemes() -> list[str]:
    """Schemes whose backend is installed or registered."""
    return sorted({*_entry_points(), *_registered})


def import_object(spec: str) -> Any:
    """Import ``"package.module:attr.path"`` (or a bare module); ImportError/AttributeError."""
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _load(target: BackendFactory | str) -> Backend:
    if isinstance(target, str):
        target = import_object(target)
    backend = target() if callable(target) and not isinstance(target, Backend) else target
    if not isinstance(backend, Backend):
        raise ConfigurationError(f"{target!r} did not produce a tracker_core Backend")
    return backend


def get_backend(scheme: str) -> Backend:
    """The backend serving ``scheme`` (loaded once per process)."""
    scheme = scheme.lower()
    with _lock:
        if scheme in _loaded:
            return _loaded[scheme]
        target = _registered.get(scheme) or _entry_points().get(scheme)
        if target is None:
            installed = ", ".join(available_schemes()) or "none"
            known = KNOWN_BACKENDS.get(scheme)
            if known:
                raise BackendNotInstalledError(
                    f"no backend installed for scheme {scheme!r}: {known['err']} "
                    f"(pip install {known['dist']}). Installed schemes: {installed}"
                )
            raise UnknownSchemeError(
                f"unknown artifact URI scheme {scheme!r}. Installed schemes: {installed}"
            )
        try:
            backend = _load(target)
        except ImportError as exc:
            dist = KNOWN_BACKENDS.get(scheme, {}).get("dist", "the backend's distribution")
            raise BackendNotInstalledError(
                f"the backend for scheme {scheme!r} failed to import ({exc}); reinstall {dist}"
            ) from exc
        _loaded[scheme] = backend
        log.debug("loaded backend %r for scheme %r", type(backend).__name__, scheme)
        return backend
