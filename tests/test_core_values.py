"""Unit tests of the core values: params round trip, accumulators, names, registry, retry."""

from __future__ import annotations

import enum
import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tracker_core
from tracker_core import (
    BackendNotInstalledError,
    FineTuningIteration,
    FineTuningParams,
    InvalidNameError,
    InvalidParamsError,
    MaxAttemptsReachedException,
    MetricsAccumulator,
    MetricValue,
    RetryConfig,
    RetryParams,
    TransientError,
    UnknownSchemeError,
)
from tracker_core.errors import redact
from tracker_core.registry import get_backend, scheme_of
from tracker_core.retry import Retrier


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.frozen
class P(FineTuningParams):
    i: int
    f: float
    b: bool
    s: str
    c: Color
    lvl: Level
    xs: list[float]
    names: list[str]
    maybe: int | None = None
    maybe_s: str | None = None


scalars = st.fixed_dictionaries(
    {
        "i": st.integers(-(2**53), 2**53),
        "f": st.floats(allow_nan=False, allow_infinity=False),
        "b": st.booleans(),
        "s": st.text(),
        "c": st.sampled_from(Color),
        "lvl": st.sampled_from(Level),
        "xs": st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4),
        "names": st.lists(st.text(max_size=5), max_size=4),
        "maybe": st.none() | st.integers(),
        "maybe_s": st.none() | st.text(max_size=5),
    }
)


@given(scalars)
def test_params_round_trip_through_mlflow_strings(values: dict[str, object]) -> None:
    params = P(**values)  # type: ignore[arg-type]
    stored = params.to_mlflow()
    assert all(isinstance(v, str) for v in stored.values())
    back = P.from_mlflow(stored)
    assert back == params
    assert back.id == params.id
    assert type(back.i) is int and type(back.f) is float and type(back.b) is bool
    assert isinstance(back.c, Color) and isinstance(back.lvl, Level)


def test_params_id_is_stable_and_order_independent() -> None:
    a = P(i=1, f=0.5, b=True, s="x", c=Color.RED, lvl=Level.LOW, xs=[1.0], names=["a"])
    b = P(names=["a"], xs=[1.0], lvl=Level.LOW, c=Color.RED, s="x", b=True, f=0.5, i=1)
    assert a.id == b.id
    # pinned: the same params must mean the same run across processes and versions
    assert a.id == P.from_mlflow(a.to_mlflow()).id
    assert a.id != attrs.evolve(a, f=0.25).id
    assert len(a.id) == 16


def test_unsupported_param_types_rejected() -> None:
    @attrs.frozen
    class WithDict(FineTuningParams):
        d: dict[str, int]

    @attrs.frozen
    class WithUnion(FineTuningParams):
        u: int | str

    @attrs.frozen
    class Nested(FineTuningParams):
        n: list[list[int]]

    for cls, value in ((WithDict, {"a": 1}), (WithUnion, 1), (Nested, [[1]])):
        with pytest.raises(InvalidParamsError):
            cls(value)
    with pytest.raises(InvalidParamsError):
        P(i=1, f=math.inf, b=True, s="", c=Color.RED, lvl=Level.LOW, xs=[], names=[])


def test_from_mlflow_rejects_garbage() -> None:
    good = P(i=1, f=0.5, b=True, s="x", c=Color.RED, lvl=Level.LOW, xs=[], names=[]).to_mlflow()
    with pytest.raises(InvalidParamsError):
        P.from_mlflow({**good, "params.i": "not json"})
    with pytest.raises(InvalidParamsError):
        P.from_mlflow({**good, "params.i": '"1"'})


def test_accumulator_constant_work_values() -> None:
    acc = MetricsAccumulator(
        "loss", calc_mean=True, calc_sliding=True, calc_min=True, calc_max=True, window_size=3
    )
    values = [5.0, 1.0, 3.0, 2.0, 8.0]
    out = []
    for v in values:
        out = dict(acc.accumulate(MetricValue("loss", v)))
    assert out == {
        "loss": 8.0,
        "mean_loss": pytest.approx(19 / 5),
        "sliding_loss": pytest.approx(13 / 3),
        "min_loss": 1.0,
        "max_loss": 8.0,
    }
    assert acc.accumulate(MetricValue("other", 1.0)) == []
    acc.clear()
    assert dict(acc.accumulate(MetricValue("loss", 2.0)))["mean_loss"] == 2.0


def test_iteration_names() -> None:
    it = FineTuningIteration(plugin_name="Emb", batch_id="b1", run_id="r0")
    assert str(it) == "Emb / iteration / r0 / b1"
    for bad in ("a/b", "..", "", "x\\y"):
        with pytest.raises(InvalidNameError):
            FineTuningIteration(plugin_name=bad, batch_id="b")


def test_scheme_of() -> None:
    assert scheme_of("s3://b/p") == "s3"
    assert scheme_of("gs://b") == "gs"
    assert scheme_of("/abs/path") == "file"
    assert scheme_of("relative/dir") == "file"
    assert scheme_of("file:///x") == "file"
    assert scheme_of("C:\\models") == "file"


def test_unknown_scheme_lists_installed() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        get_backend("nosuch")
    assert "file" in str(info.value)
    with pytest.raises(UnknownSchemeError):
        tracker_core.connect("nosuch://x", main_metric="m", plugin_name="p")


def test_known_but_missing_backend_names_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    from tracker_core import registry

    monkeypatch.setitem(
        registry.KNOWN_BACKENDS, "azure", {"dist": "tracker-core-azure", "err": "x"}
    )
    with pytest.raises(BackendNotInstalledError, match="tracker-core-azure"):
        get_backend("azure")


def test_retry_only_transient() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise TransientError("503")
        return "ok"

    retrier = Retrier(RetryConfig(RetryParams(max_attempts=3, wait_time_seconds=0)))
    assert retrier.call("op", flaky) == "ok" and calls["n"] == 3

    def permanent() -> None:
        calls["n"] += 1
        raise KeyError("nope")

    calls["n"] = 0
    with pytest.raises(KeyError):
        retrier.call("op", permanent)
    assert calls["n"] == 1

    def always() -> None:
        raise ConnectionResetError("reset")

    with pytest.raises(MaxAttemptsReachedException) as info:
        retrier.call("upload_model", always)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert info.value.attempts == 3


def test_retry_config_per_operation() -> None:
    config = RetryConfig(RetryParams(max_attempts=2), {"upload_model": RetryParams(max_attempts=7)})
    assert config["upload_model"].max_attempts == 7
    assert config["anything"].max_attempts == 2
    assert config == RetryConfig(
        RetryParams(max_attempts=2), {"upload_model": RetryParams(max_attempts=7)}
    )


def test_redact() -> None:
    text = "aws_secret_access_key=abcd1234 url http://user:hunter22@host/x token: xyz987"
    out = redact(text, "SENTINEL")
    assert "abcd1234" not in out and "hunter22" not in out and "xyz987" not in out
    assert redact("key SENTINEL-SECRET here", "SENTINEL-SECRET") == "key *** here"


def test_core_imports_no_backend_and_no_heavy_client() -> None:
    """DESIGN: the core imports neither mlflow, s3fs, gcsfs nor any backend (nor torch)."""
    import subprocess
    import sys

    code = (
        "import sys, tracker_core, tracker_core.cli, tracker_core.finetune, tracker_core.registry\n"
        "banned = ('mlflow', 's3fs', 'gcsfs', 'boto3', 'torch', 'tracker_core_mlflow',\n"
        "          'tracker_core_local', 'tracker_core_s3', 'tracker_core_gcs')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
