"""The task service's rules and state machines, in process and with time stepped by the test:
what a JSON body may hold (:mod:`tracker_core.service.limits`), which errors are an outage,
and how a process waits for its database and gives up (:mod:`tracker_core.service.outage`,
:mod:`tracker_core.service.gate`). The processes that use them are tested end to end in
``test_service`` and ``test_service_outage``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from procrastinate.exceptions import ConnectorException
from psycopg_pool import PoolClosed, PoolTimeout

from tracker_core.service.errors import DatabaseOutageError
from tracker_core.service.gate import DatabaseGate, DatabaseUnavailable
from tracker_core.service.limits import MAX_INT_DIGITS, MAX_JSON_DEPTH, Refusal, check_json
from tracker_core.service.outage import Backoff, Outage, OutageRider, is_outage


# ---------------------------------------------------------------------- JSON bodies
def refusal(body: bytes | str) -> Refusal:
    with pytest.raises(Refusal) as caught:
        check_json(body.encode() if isinstance(body, str) else body)
    return caught.value


def nested(depth: int) -> str:
    """A body whose ``m`` nests so that the document is ``depth`` levels deep."""
    return '{"m": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_json_nesting_integers_and_numbers_have_limits_named_with_their_field() -> None:
    assert check_json(nested(MAX_JSON_DEPTH).encode())["m"] is not None
    too_deep = refusal(nested(MAX_JSON_DEPTH + 1))
    assert too_deep.status == 422 and too_deep.field.startswith("m[0][0]")
    assert f"deeper than {MAX_JSON_DEPTH} levels" in too_deep.rule
    # too deep for the parser itself: the top-level field is still named
    assert refusal(nested(5000)).field == "m"
    assert check_json(('{"n": ' + "9" * MAX_INT_DIGITS + "}").encode())["n"] > 0
    big = refusal('{"a": {"n": -' + "9" * (MAX_INT_DIGITS + 1) + "}}")
    assert (big.status, big.field) == (422, "a.n") and f"limit is {MAX_INT_DIGITS}" in big.rule
    assert (refusal('{"x": [1, 1e400]}').field, refusal('{"x": 1e400}').status) == ("x[1]", 422)
    for constant in ("NaN", "Infinity", "-Infinity"):
        bad = refusal('{"x": {"y": ' + constant + "}}")
        assert (bad.status, bad.field) == (400, "x.y") and constant in bad.rule


def test_json_text_must_be_storable_and_everything_else_passes() -> None:
    nul_key = refusal('{"meta": {"a\\u0000b": 1}}')
    assert (nul_key.status, nul_key.field, nul_key.rule) == (
        422, "meta.a\\u0000b", "text must not contain NUL (U+0000)",
    )  # fmt: skip
    assert refusal('{"k": ["ok", "\\ud83d"]}').field == "k[1]"
    assert "surrogate" in refusal('{"k": "\\udc00x"}').rule
    assert refusal(b'{"k": "\xc3"}').status == 400  # not UTF-8
    assert refusal('{"k": ').status == 400
    fine = {"t": "tab\there, newline\n, \u00e9\U0001f600", "n": [1.5, -2, None, True], "e": {}}
    assert check_json(json.dumps(fine).encode()) == fine
    assert check_json(json.dumps(fine, ensure_ascii=False).encode()) == fine


# ---------------------------------------------------------------------- what an outage is
def raised_from(cause: BaseException) -> ConnectorException:
    try:
        raise ConnectorException() from cause
    except ConnectorException as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (psycopg.OperationalError('connection failed: ... port 5432 failed: Connection refused'),
         True),
        (psycopg.OperationalError("consuming input failed: server closed the connection"), True),
        (psycopg.OperationalError("the database system is starting up"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.CannotConnectNow("the database system is shutting down"), True),
        (PoolTimeout("couldn't get a connection after 3.00 sec"), True),
        (raised_from(psycopg.OperationalError("the connection is closed")), True),
        (ConnectionRefusedError(), True),
        (psycopg.OperationalError('FATAL: password authentication failed for user "x"'), False),
        (psycopg.OperationalError('FATAL: database "tracker" does not exist'), False),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (PoolClosed("the pool is closed"), False),
        (raised_from(psycopg.errors.UniqueViolation("duplicate key")), False),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), False),
        (RuntimeError("boom"), False),
    ],
)  # fmt: skip
def test_is_outage_tells_a_database_that_does_not_answer_from_one_that_refuses(
    error: BaseException, outage: bool
) -> None:
    assert is_outage(error) is outage


# ---------------------------------------------------------------------- riding it out
class Clock:
    """Time stepped by the test: ``sleep`` moves it on at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds
        await asyncio.sleep(0)


def failing(times: int, error: Callable[[], BaseException]) -> Callable[[], Awaitable[str]]:
    calls = {"n": 0}

    async def operation() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return f"done after {calls['n']}"

    return operation


def refused() -> BaseException:
    return raised_from(psycopg.OperationalError("connection failed: Connection refused"))


def test_a_rider_waits_with_backoff_and_the_database_is_up_again_after() -> None:
    clock = Clock()
    outage = Outage(budget=300, clock=clock)
    rider = OutageRider(outage, Backoff(first=0.1, cap=1.0), sleep=clock.sleep)
    assert asyncio.run(rider.run(failing(6, refused))) == "done after 7"
    assert clock.slept == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert not outage.down and outage.recovered_at == clock.now and not rider.given_up.is_set()
    # heartbeats judged only once the database has been up a while (as this process saw it)
    assert not outage.settled(3.0)
    clock.now += 3.0
    assert outage.settled(3.0)
    # an error that waiting does not fix fails at once
    with pytest.raises(ConnectorException):
        asyncio.run(
            rider.run(failing(1, lambda: raised_from(psycopg.errors.UniqueViolation("dup"))))
        )
    assert clock.slept[6:] == [] and not outage.down


def test_a_rider_gives_up_past_the_budget_or_a_grace_period_once_stopping() -> None:
    clock = Clock()
    gave_up: list[float] = []
    outage = Outage(budget=10, clock=clock)
    rider = OutageRider(
        outage, Backoff(first=1, cap=4), sleep=clock.sleep, on_give_up=lambda: gave_up.append(1)
    )
    with pytest.raises(DatabaseOutageError) as caught:
        asyncio.run(rider.run(failing(100, refused)))
    assert clock.slept == [1, 2, 4, 3]  # the last wait ends at the budget
    assert "did not answer for 10 s (--database-outage-seconds 10)" in str(caught.value)
    assert "Connection refused" in str(caught.value) and rider.given_up.is_set()
    with pytest.raises(DatabaseOutageError):  # after giving up, at once
        asyncio.run(rider.run(failing(1, refused)))
    assert len(clock.slept) == 4 and gave_up == [1]

    clock = Clock()
    outage = Outage(budget=300, clock=clock)
    rider = OutageRider(outage, Backoff(first=1, cap=4), sleep=clock.sleep)
    outage.stopping(2.5)
    assert asyncio.run(rider.run(failing(1, refused))) == "done after 2"  # up: no effect
    with pytest.raises(DatabaseOutageError, match="stopped while the task database"):
        asyncio.run(rider.run(failing(100, refused)))
    assert clock.slept == [1, 1, 0.5]


def test_the_api_gate_refuses_while_down_probes_with_backoff_and_opens_by_itself() -> None:
    clock = Clock()
    probes: list[float] = []
    recovered: list[float] = []
    answers = {"up": False}

    async def probe() -> None:
        probes.append(clock.now)
        if not answers["up"]:
            raise refused()

    async def recover() -> None:
        recovered.append(clock.now)

    async def scenario() -> Any:
        gate = DatabaseGate(
            probe,
            Outage(budget=30, clock=clock),
            Backoff(first=0.5, cap=4),
            recover=recover,
            every=5,
            sleep=clock.sleep,
        )
        gate.check()  # up
        unavailable = gate.failed(refused())  # a request failed: 503 from now on
        assert unavailable.retry_after == 1 and "Connection refused" in str(unavailable)
        with pytest.raises(DatabaseUnavailable):
            gate.check()
        watch = asyncio.ensure_future(gate.watch())
        while len(probes) < 4:
            await asyncio.sleep(0)
        with pytest.raises(DatabaseUnavailable) as caught:
            gate.check()
        assert caught.value.retry_after == 4  # the next probe is 4 s away
        answers["up"] = True
        while not recovered:
            await asyncio.sleep(0)
        gate.check()  # open again, by itself
        answers["up"] = False
        while not gate.outage.down:  # probed every 5 s while up: it notices alone
            await asyncio.sleep(0)
        with pytest.raises(DatabaseOutageError, match="--database-outage-seconds 30"):
            await watch
        return gate

    asyncio.run(scenario())
    assert recovered == [probes[4]]
