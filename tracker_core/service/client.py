"""A small client of the task API, on the standard library (used by ``tracker-core task``).

Every method returns the decoded JSON answer. Error statuses raise
:class:`~tracker_core.service.errors.ServiceRequestError` with the API's message
(:class:`~tracker_core.service.errors.TaskNotFoundError` for 404); a service that cannot be
reached raises :class:`~tracker_core.service.errors.ServiceUnavailableError`.
"""

from __future__ import annotations

import builtins
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tracker_core.service.errors import (
    ServiceRequestError,
    ServiceUnavailableError,
    TaskNotFoundError,
)

__all__ = ["DEFAULT_URL", "ServiceClient"]

DEFAULT_URL = "http://127.0.0.1:5000"
_PREFIX = "/api/v1/fine-tuning"
_TERMINAL = ("done", "error", "canceled")


class ServiceClient:
    """The task API at ``url`` (e.g. ``http://127.0.0.1:5000``); ``token``: an API token,
    sent as ``Authorization: Bearer`` (never shown by ``repr``)."""

    def __init__(
        self, url: str = DEFAULT_URL, *, timeout: float = 30.0, token: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token = token

    def __repr__(self) -> str:
        return f"ServiceClient({self.url!r})"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``(status, decoded body)`` of one request; raises on error statuses."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            answer = _decode(exc.read())
            detail = answer.get("detail") if isinstance(answer, dict) else None
            message = f"{method} {path}: HTTP {exc.code}: {detail or exc.reason}"
            kind = TaskNotFoundError if exc.code == 404 else ServiceRequestError
            raise kind(message, status=exc.code, body=answer) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceUnavailableError(
                f"cannot reach the task service at {self.url}: {reason} "
                "(is `tracker-core serve` running? --url sets the address)"
            ) from None

    def create(
        self,
        method: str,
        *,
        batch_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        max_parallel_runs: int | None = None,
        proposal: str | None = None,
        max_runs: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"fine_tuning_method": method}
        if max_parallel_runs is not None:
            body["max_parallel_runs"] = max_parallel_runs
        if proposal is not None:
            body["proposal"] = proposal
        if max_runs is not None:
            body["max_runs"] = max_runs
        if batch_id is not None:
            body["batch_id"] = batch_id
        if metadata is not None:
            body["metadata"] = metadata
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return dict(self.request("POST", f"{_PREFIX}/task", body)[1])

    def get(self, task_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"{_PREFIX}/task/{urllib.parse.quote(task_id)}")[1])

    def list(
        self,
        *,
        status: str | None = None,
        method: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        query = {"limit": limit, "offset": offset}
        if status:
            query["status"] = status  # type: ignore[assignment]
        if method:
            query["fine_tuning_method"] = method  # type: ignore[assignment]
        return dict(self.request("GET", f"{_PREFIX}/task?{urllib.parse.urlencode(query)}")[1])

    def cancel(self, task_id: str) -> dict[str, Any]:
        path = f"{_PREFIX}/task/{urllib.parse.quote(task_id)}/cancel"
        return dict(self.request("POST", path)[1])

    def methods(self) -> builtins.list[dict[str, Any]]:
        return list(self.request("GET", f"{_PREFIX}/methods")[1])

    def health(self) -> dict[str, Any]:
        return dict(self.request("GET", "/health")[1])

    def wait(
        self, task_id: str, *, poll: float = 1.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll until the task ends (done, error or canceled); the final task. Raises
        ``TimeoutError`` after ``timeout`` seconds. A 503 (the service's database does not
        answer) is waited out like a task still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                task = self.get(task_id)
            except ServiceRequestError as exc:
                if exc.status != 503:  # 503: its database does not answer now; it will
                    raise
                task = {"status": "unknown (the task database does not answer)"}
            if task.get("status") in _TERMINAL:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} still {task.get('status')} after {timeout} s")
            time.sleep(poll)


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"detail": raw.decode(errors="replace")[:500]}
