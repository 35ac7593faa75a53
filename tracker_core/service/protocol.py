"""What a worker and its child process say to each other, as frozen types both sides ``match``.

A child runs the jobs of one fine-tuning method on one pair of stores (:class:`ChildSettings`),
one job at a time. Worker -> child, on the *control* pipe: a job (:data:`Job`: :class:`TaskJob`,
:class:`RunJob`, :class:`CompletionJob`); :class:`Stop` asks the job to stop at its next safe
point; :class:`Release` lets an idle child go (it exits). End of file means the worker died: the
child exits at once, leaving its run unfinished, as the worker's own crash would have.

Child -> worker, on the *events* pipe: :class:`Progress` (a task job that trains its runs
itself) and :class:`Notice` (a log line to say once per worker), then exactly one outcome
(:data:`Outcome`) per job; no text in them holds a URI's password. After an outcome that leaves the
child clean (:func:`keeps_child`) and no stop request, the child waits for its next job;
otherwise it exits. The worker adds :class:`Crashed` for a child that ended without an outcome.

Where each job comes from and how its outcome ends its task is told once, in
:mod:`tracker_core.service.executions`.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, ClassVar, TypeAlias

import attrs

from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.values import RunStatus

__all__ = [
    "ChildSettings",
    "CompletionJob",
    "Crashed",
    "Done",
    "Error",
    "Failed",
    "Job",
    "Notice",
    "Outcome",
    "Planned",
    "Progress",
    "Ran",
    "Release",
    "Retry",
    "RunJob",
    "Stop",
    "StopReason",
    "Stopped",
    "TaskJob",
    "keeps_child",
]


class StopReason(enum.Enum):
    """Why a job is asked to stop; a stronger reason wins over a weaker one."""

    #: this worker stops: the job goes back to the queue
    SHUTDOWN = 0
    #: the task was canceled
    CANCEL = 1
    #: another execution holds the task now: write nothing more
    LOST = 2

    def __str__(self) -> str:
        return self.name.lower()


@attrs.frozen
class ChildSettings:
    """What every job of one child shares: the method and how to open its stores (picklable;
    a warm child is reused only for jobs with equal settings)."""

    method: str
    #: what load_method takes: an entry-point name or module:attr
    method_spec: str
    tracking_uri: str
    artifact_uri: str
    seed: int = 0
    work_dir: str | None = None
    log_level: int = logging.WARNING
    #: the managers' run lease (a dead worker's run resumes this long after it died)
    lease_seconds: float = DEFAULT_LEASE_SECONDS


# ---------------------------------------------------------------------- jobs (worker -> child)
@attrs.frozen
class TaskJob:
    """A task's own job: plan its iteration (steps 1-3); then train its runs here when at most
    one can train at a time (:class:`Done` / :class:`Failed`), else hand the plan back
    (:class:`Planned`)."""

    kind: ClassVar[str] = "task"
    task_id: str
    batch_id: str
    #: the task's own cap of parallel runs (None: as many as there are free workers)
    max_parallel_runs: int | None = None
    #: the task's proposal policy and budget of runs (None: the method's)
    proposal: str | None = None
    max_runs: int | None = None

    @property
    def label(self) -> str:
        return self.task_id


@attrs.frozen
class RunJob:
    """One run job: steps 4-6 and 8 for one params set of a planned iteration (:class:`Ran`)."""

    kind: ClassVar[str] = "run"
    task_id: str
    #: the iteration's plan (IterationPlan.to_json())
    plan: dict[str, Any]
    params_id: str

    @property
    def label(self) -> str:
        return f"{self.task_id}/{self.params_id}"


@attrs.frozen
class CompletionJob:
    """The completion job: step 7 once every run ended (:class:`Done` / :class:`Failed`)."""

    kind: ClassVar[str] = "complete"
    task_id: str
    plan: dict[str, Any]
    #: {params id: (trained, error)} as the run jobs reported them
    outcomes: dict[str, tuple[bool, str | None]]

    @property
    def label(self) -> str:
        return self.task_id


Job: TypeAlias = TaskJob | RunJob | CompletionJob


@attrs.frozen
class Stop:
    """Stop the current job at its next safe point."""

    reason: StopReason


@attrs.frozen
class Release:
    """The idle child is not needed any more: exit."""


# ---------------------------------------------------------------------- events (child -> worker)
@attrs.frozen
class Progress:
    """How far a task job that trains its own runs is (the task's ``progress``)."""

    planned: int
    queued: int
    running: int
    #: ended FINISHED
    finished: int
    #: ended FAILED
    failed: int
    #: stopped by the search's pruner (KILLED)
    pruned: int = 0

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.frozen
class Notice:
    """A log line the worker says once, however many children send it
    (:data:`tracker_core.service.logs.ONCE`)."""

    line: str


@attrs.frozen
class Done:
    """The iteration is complete; ``result`` is its :meth:`IterationResult.to_json`."""

    result: dict[str, Any]


@attrs.frozen
class Failed:
    """Every run of the iteration failed (the previous iteration was kept)."""

    message: str


@attrs.frozen
class Planned:
    """The task job planned an iteration whose runs are for separate run jobs."""

    plan: dict[str, Any]
    #: the cap in force (None: as many as there are free workers)
    parallel_runs: int | None


@attrs.frozen
class Ran:
    """A run job's run ended (or had ended before: ``trained`` False)."""

    run_id: str
    status: RunStatus = attrs.field(converter=RunStatus)
    metric: float | None
    trained: bool
    error: str | None
    has_model: bool


@attrs.frozen
class Stopped:
    """The job stopped on request (its run is left unfinished, resumable)."""

    message: str


@attrs.frozen
class Retry:
    """The stores failed past their own retries (or a lease was lost): worth another attempt."""

    message: str


@attrs.frozen
class Error:
    """Anything else: the job cannot succeed by being attempted again."""

    message: str


@attrs.frozen
class Crashed:
    """The child ended without an outcome (the worker's own verdict)."""

    message: str
    exitcode: int | None = None


Outcome: TypeAlias = Done | Failed | Planned | Ran | Stopped | Retry | Error | Crashed


def keeps_child(outcome: Outcome) -> bool:
    """Whether a child is left clean by a job that ended so: then it may take the next job of
    the same settings (a warm child); after any other outcome it exits."""
    return isinstance(outcome, Done | Planned | Ran)
