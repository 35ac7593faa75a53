"""Which GCS failures are worth a retry.

gcsfs raises ``FileNotFoundError`` for 404, ``OSError("Forbidden: ...")`` for 403,
``HttpError`` (with ``.code``) for other error statuses, ``requests.exceptions.ProxyError``
for 502, ``ValueError`` for requests it calls invalid, and lets aiohttp / asyncio connection
errors and timeouts through. :func:`classify_gcs_error` looks at the whole chain.
"""

from __future__ import annotations

import asyncio

from tracker_core.retry import classify_chain, classify_http_status

__all__ = ["classify_gcs_error"]


def _classify_one(exc: BaseException) -> bool | None:
    import aiohttp
    import google.auth.exceptions as gae
    import requests
    from gcsfs.retry import ChecksumError, HttpError

    if isinstance(exc, HttpError):
        return classify_http_status(exc.code)
    if isinstance(exc, aiohttp.ClientResponseError):
        return classify_http_status(exc.status)
    if isinstance(exc, aiohttp.ClientError | ChecksumError):
        return True  # connection refused/reset, payload cut short, corrupted transfer
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True  # includes ProxyError: gcsfs's translation of 502
    if isinstance(exc, gae.TransportError):
        return True  # the token endpoint was unreachable
    if isinstance(exc, gae.RefreshError):
        return bool(getattr(exc, "retryable", False))  # bad key: permanent
    if isinstance(exc, gae.DefaultCredentialsError):
        return False
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    return None


def classify_gcs_error(exc: BaseException) -> bool | None:
    """True if ``exc`` is a transient GCS failure, False if permanent, None if unknown.

    Transient: HTTP 5xx / 408 / 429, connection errors, timeouts, checksum mismatches,
    unreachable token endpoint. Permanent: 401, 403 (``Forbidden``), 404 (missing bucket or
    object), other 4xx, unusable credentials.
    """
    verdict = classify_chain(exc, _classify_one)
    if verdict is not None:
        return verdict
    if isinstance(exc, FileNotFoundError | PermissionError | FileExistsError):
        return False
    if isinstance(exc, OSError) and str(exc).startswith("Forbidden"):
        return False  # gcsfs's 403
    if isinstance(exc, ValueError) and str(exc).startswith("Bad Request"):
        return False
    return None
