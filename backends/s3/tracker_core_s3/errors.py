"""Which S3 failures are worth a retry.

s3fs turns botocore's ``ClientError`` into ``OSError`` subclasses (``PermissionError`` for
AccessDenied / InvalidAccessKeyId / SignatureDoesNotMatch, ``FileNotFoundError`` for
NoSuchBucket / NoSuchKey, ``OSError(EBUSY)`` for SlowDown / ServiceUnavailable, ...) and
chains the original as ``__cause__``; connection errors and timeouts come through untranslated
(botocore, aiohttp or asyncio exceptions). :func:`classify_s3_error` therefore looks at the
whole chain, judging by the S3 error code and HTTP status where there is one.
"""

from __future__ import annotations

import asyncio
import errno

from tracker_core.retry import classify_chain, classify_http_status

__all__ = ["PERMANENT_CODES", "TRANSIENT_CODES", "classify_s3_error"]

#: S3 error codes worth a retry (throttling, server-side trouble)
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",
        "IDPCommunicationError",
        "EC2ThrottledException",
    }
)
#: S3 error codes no retry can fix
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "NotSignedUp",
        "RequestTimeTooSkewed",
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "InvalidBucketName",
        "InvalidArgument",
        "InvalidRequest",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "MethodNotAllowed",
        "EntityTooLarge",
        "EntityTooSmall",
    }
)
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EREMOTEIO})


def _classify_one(exc: BaseException) -> bool | None:
    import botocore.exceptions as bce
    from botocore.parsers import ResponseParserError

    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code", ""))
        if code in TRANSIENT_CODES:
            return True
        if code in PERMANENT_CODES:
            return False
        status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
        if status is None and code.isdigit():
            status = int(code)  # HEAD responses carry no body: the code is the status
        return classify_http_status(status)
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return False
    if isinstance(
        exc,
        bce.ConnectionError  # EndpointConnectionError, ConnectTimeoutError, proxy errors
        | bce.HTTPClientError  # ReadTimeoutError, ConnectionClosedError, streaming errors
        | bce.IncompleteReadError
        | ResponseParserError,  # throttling answers sometimes are not valid XML
    ):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with aiobotocore
        aiohttp = None  # type: ignore[assignment]
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientResponseError):
            return classify_http_status(exc.status)
        if isinstance(exc, aiohttp.ClientError):
            return True
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    return None


def classify_s3_error(exc: BaseException) -> bool | None:
    """True if ``exc`` is a transient S3 failure, False if permanent, None if unknown.

    Transient: connection errors and timeouts (botocore, aiohttp, asyncio), HTTP 5xx / 408 /
    429, SlowDown, Throttling, RequestLimitExceeded, InternalError, ServiceUnavailable.
    Permanent: AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, NoSuchBucket,
    missing credentials, other 4xx. Judged on the first link of the exception chain that
    says something, then on the s3fs-translated ``OSError`` itself.
    """
    verdict = classify_chain(exc, _classify_one)
    if verdict is not None:
        return verdict
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True  # SlowDown / ServiceUnavailable / InternalError without their cause
    return None
