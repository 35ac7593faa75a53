"""Telling someone that the champion changed: a signed webhook (or a command), retried.

:class:`Webhook` is configuration (a value): where to send (an ``http(s)`` URL, or a command
that gets the body on its standard input) and the HMAC secret that signs the body. What is
sent is one JSON object per promotion (or rollback); its ``idempotency_key`` names that
promotion, so a receiver that sees the same key twice (a crash after the delivery and before
it was recorded, see :mod:`tracker_core.promotion`) acts once.

Each delivery carries, besides the body:

- ``X-Tracker-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes with the secret
  (check it with :func:`signature` and :func:`hmac.compare_digest`);
- ``X-Tracker-Idempotency-Key``: the body's ``idempotency_key``.

A command gets the same two values as ``TRACKER_SIGNATURE`` and ``TRACKER_IDEMPOTENCY_KEY``
in its environment. Delivery runs under the retry policy's ``notify`` operation: connection
errors, timeouts, 5xx and 429 (a command: a non-zero exit) are retried; another 4xx is
refused for good. The URL is never logged past its host (webhook URLs often carry a token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from tracker_core.errors import ConfigurationError, TrackerError, TransientError
from tracker_core.retry import Retrier, classify_http_status

__all__ = ["Webhook", "WebhookError", "signature"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Tracker-Signature"
KEY_HEADER = "X-Tracker-Idempotency-Key"


class WebhookError(TrackerError):
    """The webhook refused the notification (a 4xx), or kept failing past its retries."""


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` with ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _url(_inst: object, _attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and urlsplit(value).scheme not in ("http", "https"):
        raise ConfigurationError("webhook url must be an http:// or https:// URL")


def _command(value: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class Webhook:
    """Where a promotion is announced: ``url`` (POST) or ``command`` (argv), and ``secret``."""

    secret: str = attrs.field(repr=False)
    url: str | None = attrs.field(default=None, validator=_url, repr=False)
    command: tuple[str, ...] | None = attrs.field(default=None, converter=_command)
    timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if (self.url is None) == (self.command is None):
            raise ConfigurationError("a webhook needs exactly one of url= and command=")
        if not self.secret:
            raise ConfigurationError("a webhook needs a non-empty secret (it signs the body)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Webhook | None:
        """``$TRACKER_CORE_WEBHOOK_URL`` (or ``$TRACKER_CORE_WEBHOOK_COMMAND``, split on
        spaces) with ``$TRACKER_CORE_WEBHOOK_SECRET``; None if neither is set."""
        env = os.environ if environ is None else environ
        url, command = env.get("TRACKER_CORE_WEBHOOK_URL"), env.get("TRACKER_CORE_WEBHOOK_COMMAND")
        if not url and not command:
            return None
        secret = env.get("TRACKER_CORE_WEBHOOK_SECRET", "")
        return cls(secret, url=url or None, command=command.split() if command else None)

    @property
    def target(self) -> str:
        """Where it goes, for logs: the URL's scheme and host only, or the command's name."""
        if self.url is not None:
            parts = urlsplit(self.url)
            return f"{parts.scheme}://{parts.hostname}"
        assert self.command is not None
        return os.path.basename(self.command[0])

    def send(self, payload: Mapping[str, Any], retrier: Retrier) -> None:
        """Deliver ``payload`` (with its ``idempotency_key``), retried; raises
        :class:`WebhookError` if it was refused or kept failing."""
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        key = str(payload["idempotency_key"])
        try:
            retrier.call("notify", self._deliver, body, key)
        except TrackerError as exc:
            raise WebhookError(f"notification to {self.target} failed: {exc}") from None
        log.info("notified %s (%s)", self.target, key)

    def _deliver(self, body: bytes, key: str) -> None:
        sig = signature(self.secret, body)
        if self.command is not None:
            env = {**os.environ, "TRACKER_SIGNATURE": sig, "TRACKER_IDEMPOTENCY_KEY": key}
            try:
                done = subprocess.run(
                    self.command, input=body, env=env, timeout=self.timeout, capture_output=True
                )
            except subprocess.TimeoutExpired:
                raise TransientError(f"{self.target} did not end within {self.timeout} s") from None
            if done.returncode != 0:
                raise TransientError(f"{self.target} exited with status {done.returncode}")
            return
        assert self.url is not None
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sig, KEY_HEADER: key}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            if classify_http_status(exc.code):
                raise TransientError(f"{self.target} answered {exc.code}") from None
            raise WebhookError(f"{self.target} refused the notification ({exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientError(f"{self.target} unreachable: {type(reason).__name__}") from None
