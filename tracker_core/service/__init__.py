"""The fine-tuning task service: an HTTP API that queues fine-tuning tasks, and workers that
run them with :func:`tracker_core.finetune.run_iteration`.

Installed with the extra ``tracker-core[service]``; ``import tracker_core`` imports none of it,
and importing this package imports no web framework, queue or database driver either (each
module imports what it needs). Modules, one concept each:

- :mod:`~tracker_core.service.settings`: the settings of a service process (a value);
- :mod:`~tracker_core.service.registry`: which fine-tuning methods a service offers;
- :mod:`~tracker_core.service.models`: task statuses, ids and the API's request/response shapes;
- :mod:`~tracker_core.service.schema`: the task table, created beside Procrastinate's;
- :mod:`~tracker_core.service.repository`: reads and state transitions of task rows, composed
  of :mod:`~tracker_core.service.task_rows` (reads, creation, a task's own job, cancels) and
  :mod:`~tracker_core.service.run_rows` (fan-out, run jobs, completion), over one seam
  (:mod:`~tracker_core.service.task_table`);
- :mod:`~tracker_core.service.queue`: the Procrastinate app: queues, jobs, retries, stalled jobs;
- :mod:`~tracker_core.service.executions`: the life of a task's jobs, told once: what each
  kind of job does in its child, and how it ends;
- :mod:`~tracker_core.service.protocol`: the messages of a worker and its child, as types;
- :mod:`~tracker_core.service.child`: the child process that runs a worker's jobs;
- :mod:`~tracker_core.service.supervisor`: the worker's side of its children (start, progress,
  stop, keep warm);
- :mod:`~tracker_core.service.worker`: a worker process (the task queue + maintenance);
- :mod:`~tracker_core.service.api`: the FastAPI application;
- :mod:`~tracker_core.service.limits`: what the API accepts (body size, JSON and URL rules);
- :mod:`~tracker_core.service.outage`: riding out an outage of the task database (what counts
  as one, backoff, giving up), for workers; :mod:`~tracker_core.service.gate`: the API's 503s;
- :mod:`~tracker_core.service.auth`: who may call it, from where (tokens, scopes, hosts);
- :mod:`~tracker_core.service.tokens`: API tokens, stored as hashes in the task database;
- :mod:`~tracker_core.service.logs`: one log format for every logger, no secret in any line;
- :mod:`~tracker_core.service.embedded`: the private PostgreSQL of the embedded layout;
- :mod:`~tracker_core.service.server`: ``tracker-core serve`` (API, optional worker, database);
- :mod:`~tracker_core.service.client`: a small HTTP client of the API (CLI, tests);
- :mod:`~tracker_core.service.cli`: the ``serve``, ``worker``, ``task`` and ``token``
  commands (the ``task`` ones in :mod:`~tracker_core.service.cli_tasks`, the ``token`` ones
  and where secrets come from in :mod:`~tracker_core.service.cli_tokens`).
"""

from tracker_core.service.errors import (
    ServiceError,
    ServiceRequestError,
    ServiceUnavailableError,
    TaskNotFoundError,
)

__all__ = [
    "ServiceError",
    "ServiceRequestError",
    "ServiceUnavailableError",
    "TaskNotFoundError",
]
