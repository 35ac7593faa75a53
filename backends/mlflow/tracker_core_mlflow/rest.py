"""HTTP to an MLflow server: one request per tracker-core attempt, with a bounded timeout.

MLflow's ``RestStore`` sends each call through ``mlflow.utils.rest_utils.call_endpoint`` ->
``http_request(max_retries=None)``, so every request carries MLflow's own ``urllib3`` retries,
read from the process-wide ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7, backoff factor 2,
120 s timeout). Under tracker-core's retry policy those nest: a dead server made one
``set_iteration`` take 742 s (3 attempts x 8 requests with minutes of backoff).

:func:`single_attempt_client` builds an ``MlflowClient`` whose tracking store is a
:class:`SingleAttemptRestStore`: the same REST calls, each sent once (``max_retries=0``, no
backoff) with an explicit timeout, so the caller's retry policy is the only one. Nothing
process-wide changes: no environment variable is set, MLflow's store registry and its cache are
untouched, and every other ``MlflowClient`` in the process keeps MLflow's defaults.

This relies on MLflow internals, pinned by ``tests/test_http_retries.py`` (mlflow 3.17.2):
``MlflowClient._tracking_client`` (a ``TrackingServiceClient`` whose ``store`` property
resolves the store), ``RestStore._call_endpoint`` (mirrored here) and ``call_endpoint``
(mirrored by :func:`call_once`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.protos.service_pb2 import LogBatch
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response

from tracker_core.values import MetricValue

__all__ = [
    "SingleAttemptRegistryRestStore",
    "SingleAttemptRestStore",
    "call_once",
    "send_once",
    "single_attempt_client",
]


def call_once(
    host_creds: MlflowHostCreds,
    endpoint: str,
    method: str,
    json_body: str | None,
    response_proto: Any,
    *,
    timeout: float,
    retry_timeout_seconds: float | None = None,
) -> Any:
    """``mlflow.utils.rest_utils.call_endpoint`` with one HTTP request and no backoff.

    A 5xx/429 answer is returned by urllib3 rather than retried (``raise_on_status=False``),
    so the server's own error body becomes the ``RestException``/``MlflowException`` that
    the caller classifies.
    """
    body = json.loads(json_body) if json_body is not None else None
    return send_once(
        host_creds,
        endpoint,
        method,
        body,
        response_proto,
        timeout=timeout,
        retry_timeout_seconds=retry_timeout_seconds,
    )


def send_once(
    host_creds: MlflowHostCreds,
    endpoint: str,
    method: str,
    body: Mapping[str, Any] | None,
    response_proto: Any,
    *,
    timeout: float,
    retry_timeout_seconds: float | None = None,
) -> Any:
    """:func:`call_once` with the request body as a ``dict`` (serialised once, by requests)."""
    kwargs: dict[str, Any] = {"params" if method == "GET" else "json": body}
    if retry_timeout_seconds is not None:
        kwargs["retry_timeout_seconds"] = retry_timeout_seconds
    response = http_request(  # type: ignore[no-untyped-call]
        host_creds=host_creds,
        endpoint=endpoint,
        method=method,
        max_retries=0,
        backoff_factor=0,
        backoff_jitter=0,
        timeout=timeout,
        raise_on_status=False,
        **kwargs,
    )
    response = verify_rest_response(response, endpoint)  # raises unless 200
    parse_dict(js_dict=json.loads(response.text), message=response_proto)  # type: ignore[no-untyped-call]
    return response_proto


class SingleAttemptRestStore(RestStore):  # type: ignore[misc]
    """MLflow's REST tracking store, sending each request once with a timeout of ``timeout``
    seconds (connect and read)."""

    def __init__(self, get_host_creds: Callable[[], MlflowHostCreds], timeout: float) -> None:
        super().__init__(get_host_creds)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def _call_endpoint(
        self,
        api: Any,
        json_body: str | None = None,
        endpoint: str | None = None,
        retry_timeout_seconds: float | None = None,
        response_proto: Any = None,
    ) -> Any:
        # RestStore._call_endpoint (mlflow 3.17.2), with call_once for call_endpoint
        method_to_info = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        self._validate_workspace_support_if_specified()
        if endpoint:
            _, method = method_to_info[api]
        else:
            endpoint, method = method_to_info[api]
        return call_once(
            self.get_host_creds(),
            endpoint,
            method,
            json_body,
            response_proto or api.Response(),
            timeout=self.timeout,
            retry_timeout_seconds=retry_timeout_seconds,
        )

    def log_batch_values(
        self,
        run_id: str,
        metrics: Sequence[MetricValue],
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``RestStore.log_batch`` without MLflow's entities and protobuf JSON: the body is
        built as plain ``dict`` s and serialised once. The same JSON reaches the server, but
        the sender's work per value drops from ~30 us (an entity, a proto, ``MessageToJson``,
        parsed back by ``call_endpoint``, dumped again) to ~1 us, and that work holds the
        GIL the training loop needs (see :mod:`tracker_core.metrics`). Within MLflow's limits
        per request (the caller splits)."""
        endpoint, method = self._METHOD_TO_INFO[LogBatch]
        self._validate_workspace_support_if_specified()
        body = {
            "run_id": run_id,
            "metrics": [
                {
                    "key": v.name,
                    "value": v.value,  # finite: MetricValue checks
                    "timestamp": v.timestamp_ms,
                    "step": v.step or 0,
                }
                for v in metrics
            ],
            "params": [{"key": k, "value": value} for k, value in params],
            "tags": [{"key": k, "value": value} for k, value in tags],
        }
        send_once(
            self.get_host_creds(), endpoint, method, body, LogBatch.Response(), timeout=self.timeout
        )


class SingleAttemptRegistryRestStore(RegistryRestStore):  # type: ignore[misc]
    """MLflow's REST model registry store, sending each request once with a timeout of
    ``timeout`` seconds (the registry's counterpart of :class:`SingleAttemptRestStore`)."""

    def __init__(self, get_host_creds: Callable[[], Any], timeout: float) -> None:
        super().__init__(get_host_creds)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def _call_endpoint(
        self,
        api: Any,
        json_body: str | None,
        call_all_endpoints: bool = False,
        extra_headers: Any = None,
    ) -> Any:
        # RestStore._call_endpoint (mlflow 3.17.2) with call_once for call_endpoint
        self._validate_workspace_support_if_specified()
        endpoint, method = self._get_endpoint_from_method(api)  # type: ignore[no-untyped-call]
        return call_once(
            self.get_host_creds(),
            endpoint,
            method,
            json_body,
            self._get_response_from_method(api),  # type: ignore[no-untyped-call]
            timeout=self.timeout,
        )


class _OwnStoreTrackingClient(TrackingServiceClient):  # type: ignore[misc]
    """A ``TrackingServiceClient`` that always uses the one store it was given, instead of
    resolving (and caching, process-wide) a store for its URI."""

    def __init__(self, tracking_uri: str, store: Any) -> None:
        self._own_store = store
        super().__init__(tracking_uri)  # type: ignore[no-untyped-call]

    @property
    def store(self) -> Any:
        return self._own_store


def single_attempt_client(tracking_uri: str, timeout: float) -> MlflowClient:
    """An ``MlflowClient`` for ``tracking_uri``; over HTTP(S) to an MLflow server, its
    requests are sent once each with ``timeout``. Other stores (SQL databases, Databricks)
    are MLflow's, unchanged."""
    client = MlflowClient(tracking_uri=tracking_uri)
    service = client._tracking_client
    store = service.store
    if type(store) is RestStore:  # plain http(s)://; Databricks stores are subclasses
        own = SingleAttemptRestStore(store.get_host_creds, timeout)
        client._tracking_client = _OwnStoreTrackingClient(service.tracking_uri, own)
    return client
