"""The task service's rules, in process: what a JSON body may hold
(:mod:`tracker_core.service.limits`). The API that uses them is tested end to end in
``test_service``."""

from __future__ import annotations

import json

import pytest

from tracker_core.service.limits import MAX_INT_DIGITS, MAX_JSON_DEPTH, Refusal, check_json


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
