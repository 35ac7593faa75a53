"""What a chaos trial is made of, from its seed: its settings (storage, ``keep``, shape), the
sizes of a full or a quick trial, the workers' environment, and the result it records."""

from __future__ import annotations

import sys
from collections import Counter

import attrs

from chaos.facts import Check

__all__ = ["CLIENT_ENV", "Sizes", "TrialResult", "say", "settings_of"]

#: environment of the workers and of gc: one request per retry attempt, short timeouts
CLIENT_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TQDM_DISABLE": "1",
}


@attrs.frozen
class Sizes:
    """How big a trial is."""

    workers: int = 8
    runs_per_worker: int = 10  # shape "one"
    iterations: int = 4  # shape "sequence"
    runs_per_iteration: int = 8  # shape "sequence": shared by all workers
    loss_points: int = 300
    large_fraction: float = 0.1  # models of ~11 MiB (three S3 multipart parts)
    armed_kills: int = 12  # at most this many kill-point kills per trial
    random_kills: int = 4  # and this many kills at random moments
    random_kill_every: float = 10.0  # mean seconds between random kills
    arm_probability: float = 0.6
    max_errors_per_worker: int = 3
    lease_seconds: float = 15.0
    fault_rate: float = 0.2
    storage_timeout: float = 2.0
    #: (attempts, first wait, longest wait): the default, and for whole-folder transfers
    retry: tuple[int, float, float] = (12, 0.1, 2.0)
    retry_transfers: tuple[int, float, float] = (40, 0.1, 2.0)
    trial_timeout: float = 20 * 60.0

    @classmethod
    def full_load(cls) -> Sizes:
        """The issue's load: 8 workers x 25 runs (shape one), 4 iterations of 16 runs."""
        return cls(runs_per_worker=25, runs_per_iteration=16)

    @classmethod
    def quick(cls) -> Sizes:
        """The short trial of ``make test``: a few workers, a few kills, faults on."""
        return cls(
            workers=3,
            runs_per_worker=4,
            iterations=2,
            runs_per_iteration=6,
            loss_points=50,
            large_fraction=0.2,
            armed_kills=3,
            random_kills=1,
            random_kill_every=8.0,
            arm_probability=0.8,
            lease_seconds=15.0,  # as the full trials: 8 s lapsed on a loaded machine (a starved
            # MLflow server answers past the 2 s client timeout, so renewals fail in a row)
            trial_timeout=8 * 60.0,
        )


def settings_of(seed: int) -> tuple[str, int, str]:
    """``(storage, keep, shape)`` of the trial with this seed."""
    storage = ("s3", "gcs")[seed % 2]
    keep = (1, 3)[(seed // 2) % 2]
    shape = ("one", "sequence")[(seed // 4) % 2]
    return storage, keep, shape


@attrs.define
class TrialResult:
    seed: int
    storage: str
    keep: int
    shape: str
    runs: int = 0
    seconds: float = 0.0
    kills: Counter[str] = attrs.field(factory=Counter)
    armed: Counter[str] = attrs.field(factory=Counter)
    faults: dict[str, Counter[str]] = attrs.field(factory=dict)
    retried: Counter[str] = attrs.field(factory=Counter)
    restarts: int = 0
    checks: dict[str, Check] = attrs.field(factory=dict)
    kept_at: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.held is not False for c in self.checks.values())


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
