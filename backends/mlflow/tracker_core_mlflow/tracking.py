"""The MLflow tracking store: :class:`~tracker_core.stores.TrackingStore` over ``MlflowClient``.

Only ``mlflow.MlflowClient(tracking_uri)`` is used, never the fluent API, so any number of
stores live in one process and are used from any thread.

The store does not retry: the caller's retry policy (tracker-core's one) does. Over HTTP to an
MLflow server, the client the store builds sends each request exactly once per call, with a
timeout (``request_timeout``: the constructor argument, else ``MLFLOW_HTTP_REQUEST_TIMEOUT`` if
set, else :data:`DEFAULT_REQUEST_TIMEOUT` seconds); MLflow's own HTTP retries
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with minutes of backoff) would otherwise nest
inside ours. This is local to the store's client (see :mod:`tracker_core_mlflow.rest`): no
environment variable is set and other ``MlflowClient`` objects in the process keep MLflow's
behaviour. A ``client`` passed in is used as it is, with its own retries.

Runs end through the store itself: ``MlflowClient.set_terminated`` prints "View run / View
experiment" lines to stdout over HTTP (and fetches the run once more to do so). Opening a
SQLite database keeps MLflow's migration INFO lines out of the user's output
(:mod:`tracker_core_mlflow.quiet`); how a URI is checked and opened is
:mod:`tracker_core_mlflow.opening`.

Credentials are best passed as ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``;
``user:password@`` in the URI works too and is redacted from every error this store raises.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from tracker_core.errors import TrackingStoreError, redact
from tracker_core.stores import ExperimentQuery, RunQuery, TrackingStore
from tracker_core.values import ExperimentRecord, MetricValue, RunRecord, RunStatus
from tracker_core_mlflow import filters
from tracker_core_mlflow.errors import (
    classify_mlflow_error,
    error_code,
    tracking_errors,
)
from tracker_core_mlflow.opening import (
    DEFAULT_REQUEST_TIMEOUT,
    check_tracking_uri,
    open_client,
    resolve_request_timeout,
)
from tracker_core_mlflow.quiet import quiet
from tracker_core_mlflow.registry import MlflowRegistryStore

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Run

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "MlflowTrackingStore", "batches", "resolve_request_timeout"]

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: MLflow's per-request limits for log_batch
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
#: page size when a search has no (or a large) limit
PAGE_SIZE = 1000
_CREATE_ATTEMPTS = 3


def _is_caught_database_error(record: logging.LogRecord) -> bool:
    """MLflow's ERROR (with a traceback) for a database error it then raises: the error
    reaches tracker-core's caller anyway, typed and named, so the record only repeats it."""
    return record.getMessage().startswith("SQLAlchemy database error")


def _operation(fn: F) -> F:
    """Run the method inside :func:`tracking_errors`, named after the method."""

    @functools.wraps(fn)
    def wrapper(self: MlflowTrackingStore, *args: Any, **kwargs: Any) -> Any:
        with (
            quiet("mlflow.store.db.utils", _is_caught_database_error),
            tracking_errors(fn.__name__, self.display_uri, self._password),
        ):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


M = TypeVar("M")
K = TypeVar("K")
G = TypeVar("G")


def batches(
    metrics: Sequence[M], params: Sequence[K], tags: Sequence[G]
) -> Iterator[tuple[list[M], list[K], list[G]]]:
    """Split into requests within MLflow's limits: 1000 metrics, 100 params, 100 tags,
    1000 entities in all. Params and tags go first."""
    m = p = t = 0
    while m < len(metrics) or p < len(params) or t < len(tags):
        chunk_p = list(params[p : p + MAX_PARAMS])
        chunk_t = list(tags[t : t + MAX_TAGS])
        room = min(MAX_METRICS, MAX_ENTITIES - len(chunk_p) - len(chunk_t))
        chunk_m = list(metrics[m : m + room])
        m, p, t = m + len(chunk_m), p + len(chunk_p), t + len(chunk_t)
        yield chunk_m, chunk_p, chunk_t


def _experiment_record(exp: Experiment) -> ExperimentRecord:
    return ExperimentRecord(
        experiment_id=str(exp.experiment_id),
        name=exp.name,
        artifact_location=exp.artifact_location,
        creation_time_ms=int(exp.creation_time or 0),
        tags=dict(exp.tags or {}),
        lifecycle_stage=exp.lifecycle_stage,
    )


def _run_record(run: Run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        experiment_id=str(info.experiment_id),
        run_name=info.run_name or "",
        status=RunStatus(info.status),
        artifact_uri=info.artifact_uri or "",
        start_time_ms=int(info.start_time or 0),
        end_time_ms=int(info.end_time) if info.end_time else None,
        metrics=dict(data.metrics),
        params=dict(data.params),
        tags=dict(data.tags),
    )


def _deleted_name(name: str, experiment_id: str) -> str:
    return f"{name} (deleted {experiment_id})"


class MlflowTrackingStore(TrackingStore):
    """Experiments and runs in MLflow (SQLite/PostgreSQL/... directly, or an MLflow server).

    Thread-safe: ``MlflowClient`` keeps no per-call state; the SQL store it uses is shared
    per URI by MLflow and opens a session per call. Failures raise
    :class:`~tracker_core.errors.TrackingStoreError` naming the operation (transient ones as
    :class:`~tracker_core_mlflow.errors.TransientTrackingStoreError`).
    """

    def __init__(
        self,
        tracking_uri: str,
        client: MlflowClient | None = None,
        *,
        request_timeout: float | None = None,
    ) -> None:
        """``request_timeout``: seconds per HTTP request to an MLflow server (see
        :func:`resolve_request_timeout`); ignored for databases and for a ``client`` passed in."""
        from tracker_core_mlflow.rest import SingleAttemptRestStore

        check_tracking_uri(tracking_uri)
        self.uri = tracking_uri
        self._password = urlsplit(tracking_uri).password
        self.display_uri = redact(tracking_uri, self._password)
        self.request_timeout = resolve_request_timeout(request_timeout)
        if client is None:
            client = open_client(
                tracking_uri, self.display_uri, self._password, self.request_timeout
            )
        self.client = client
        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        self._rest: SingleAttemptRestStore | None = (
            store if isinstance(store, SingleAttemptRestStore) else None
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_uri!r})"

    def classify_error(self, exc: BaseException) -> bool | None:
        return classify_mlflow_error(exc)

    def open_registry(self) -> MlflowRegistryStore:
        """MLflow's Model Registry beside this store (``$MLFLOW_REGISTRY_URI``, else here)."""
        return MlflowRegistryStore(self.uri, request_timeout=self.request_timeout)

    # -- experiments ------------------------------------------------------------------
    @_operation
    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        try:
            return _experiment_record(self.client.get_experiment(experiment_id))
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    @_operation
    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        exp = self.client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            return None
        return _experiment_record(exp)

    @_operation
    def create_experiment(
        self, name: str, artifact_location: str, tags: Mapping[str, str]
    ) -> ExperimentRecord:
        for _ in range(_CREATE_ATTEMPTS):
            holder = self.client.get_experiment_by_name(name)
            if holder is not None and holder.lifecycle_stage == "active":
                return _experiment_record(holder)
            if holder is not None:  # deleted by another tool: move it out of the way
                self._free_name(holder.experiment_id, name, restore=True)
            try:
                experiment_id = self.client.create_experiment(
                    name, artifact_location=artifact_location, tags=dict(tags)
                )
            except Exception as exc:
                if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                log.debug("experiment %r was created concurrently; using it", name)
                continue
            return _experiment_record(self.client.get_experiment(experiment_id))
        raise TrackingStoreError(
            f"create_experiment: {name!r} kept being created and deleted concurrently"
        )

    def _free_name(self, experiment_id: str, name: str, *, restore: bool) -> None:
        """Rename the experiment to a unique deleted name and delete it.

        MLflow renames active experiments only, so a deleted one is restored first; between
        the restore and the delete it is briefly visible (under its old name, then the new).
        """
        if restore:
            self.client.restore_experiment(experiment_id)
        self.client.rename_experiment(experiment_id, _deleted_name(name, experiment_id))
        self.client.delete_experiment(experiment_id)

    @_operation
    def search_experiments(
        self, query: ExperimentQuery, max_results: int, page_token: str | None = None
    ) -> tuple[list[ExperimentRecord], str | None]:
        """One page, newest first (``creation_time DESC, experiment_id DESC``).

        A filter MLflow cannot express (a value with both quote kinds) is applied to the
        page locally, so such a page may hold fewer than ``max_results`` experiments.
        """
        from mlflow.entities import ViewType

        filter_string, local = filters.experiment_filter(query)
        page = self.client.search_experiments(
            view_type=ViewType.ALL if query.include_deleted else ViewType.ACTIVE_ONLY,
            max_results=max_results,
            filter_string=filter_string or None,
            order_by=["creation_time DESC", "experiment_id DESC"],
            page_token=page_token,
        )
        kept = [e for e in page if all(check(e) for check in local)]
        return [_experiment_record(e) for e in kept], page.token or None

    @_operation
    def delete_experiment(self, experiment_id: str) -> None:
        """Rename to ``"<name> (deleted <id>)"``, then delete; a no-op if already deleted.

        Retrying after a crash between the two steps completes the deletion.
        """
        exp = self.client.get_experiment(experiment_id)
        if exp.lifecycle_stage != "active":
            return
        suffix = f" (deleted {experiment_id})"
        if exp.name.endswith(suffix):
            self.client.delete_experiment(experiment_id)
        else:
            self._free_name(experiment_id, exp.name, restore=False)

    @_operation
    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.client.set_experiment_tag(experiment_id, key, value)

    # -- runs ---------------------------------------------------------------------------
    @_operation
    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> RunRecord:
        run = self.client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
        return _run_record(run)

    @_operation
    def get_run(self, run_id: str) -> RunRecord | None:
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage != "active" else _run_record(run)

    @_operation
    def search_runs(self, query: RunQuery) -> list[RunRecord]:
        """Runs matching ``query``, in MLflow's order: the metric (runs without it last), then
        start time descending, then run id. Paged through with ``PAGE_SIZE``."""
        from mlflow.entities import ViewType

        limit = query.max_results
        if not query.experiment_ids or (limit is not None and limit <= 0):
            return []
        filter_string, local = filters.run_filter(query)
        page_size = min(limit, PAGE_SIZE) if limit is not None and not local else PAGE_SIZE
        found: list[Run] = []
        token: str | None = None
        while True:
            page = self.client.search_runs(
                list(query.experiment_ids),
                filter_string=filter_string,
                run_view_type=ViewType.ALL if query.include_deleted else ViewType.ACTIVE_ONLY,
                max_results=page_size,
                order_by=filters.run_order_by(query),
                page_token=token,
            )
            found.extend(r for r in page if all(check(r) for check in local))
            token = page.token or None
            if token is None or (limit is not None and len(found) >= limit):
                break
        return [_run_record(r) for r in found[:limit]]

    @_operation
    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricValue] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Log in chunks within MLflow's limits; synchronous, so failures surface here.

        Idempotent for metrics: MLflow's SQL store keys metric rows on (run, key, timestamp,
        step, value) and skips rows that already exist, so a retried batch records each point
        once. Re-logging a param with the same value is accepted; a different value is a
        permanent ``INVALID_PARAMETER_VALUE``.
        """
        if self._rest is not None:  # an MLflow server: the body built without MLflow's entities
            pairs = ([(k, str(v)) for k, v in (x or {}).items()] for x in (params, tags))
            for chunk in batches(metrics, *pairs):
                self._rest.log_batch_values(run_id, *chunk)
            return
        from mlflow.entities import Metric, Param, RunTag

        m = [Metric(v.name, v.value, v.timestamp_ms, v.step or 0) for v in metrics]
        p = [Param(k, str(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for chunk_m, chunk_p, chunk_t in batches(m, p, t):
            self.client.log_batch(run_id, chunk_m, chunk_p, chunk_t, synchronous=True)

    @_operation
    def get_metric_history(self, run_id: str, key: str) -> list[MetricValue]:
        """Every value of ``key`` in (step, timestamp) order. NaN values, which MLflow accepts
        from other clients but a :class:`MetricValue` cannot hold, are skipped with a warning."""
        history = sorted(
            self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
        )
        finite = [m for m in history if math.isfinite(m.value)]
        if len(finite) < len(history):
            log.warning(
                "%s: skipped %d NaN value(s) of metric %r", run_id, len(history) - len(finite), key
            )
        return [MetricValue(key, m.value, step=m.step, timestamp_ms=m.timestamp) for m in finite]

    @_operation
    def set_terminated(self, run_id: str, status: RunStatus) -> None:
        """End the run through MLflow's store: ``MlflowClient.set_terminated`` would also
        print two "View run" lines to stdout over HTTP, after one more ``get_run``."""
        from mlflow.entities import RunStatus as MlflowRunStatus

        self.client._tracking_client.store.update_run_info(
            run_id,
            run_status=MlflowRunStatus.from_string(str(RunStatus(status))),
            end_time=int(time.time() * 1000),
            run_name=None,
        )

    @_operation
    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    @_operation
    def delete_tag(self, run_id: str, key: str) -> None:
        try:
            self.client.delete_tag(run_id, key)
        except Exception as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.get_run(run_id)  # a missing run is still an error
