"""Errors of the task service, in tracker-core's one hierarchy (:class:`TrackerError`)."""

from __future__ import annotations

from typing import Any

from tracker_core.errors import ConfigurationError, TrackerError

__all__ = [
    "DatabaseOutageError",
    "ServiceConfigurationError",
    "ServiceError",
    "ServiceRequestError",
    "ServiceUnavailableError",
    "TaskNotFoundError",
]


class ServiceError(TrackerError):
    """Base class of the task service's errors."""


class ServiceConfigurationError(ServiceError, ConfigurationError):
    """A setting of the service is invalid (a database URL, a method spec, running as root
    without consent for the embedded database); raised before anything starts."""


class ServiceUnavailableError(ServiceError):
    """The service (its API, or its database) cannot be reached."""


class DatabaseOutageError(ServiceUnavailableError):
    """The task database did not answer for longer than a process may wait for it
    (``--database-outage-seconds``), or while the process was stopping."""


class ServiceRequestError(ServiceError):
    """The API answered a request with an error status. ``status`` is the HTTP status and
    ``body`` the decoded answer."""

    def __init__(self, message: str, *, status: int, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


class TaskNotFoundError(ServiceRequestError, LookupError):
    """No task has this id (HTTP 404)."""
