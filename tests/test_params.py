"""Unit tests of fine-tuning params: validation, normalisation, round trip, supported types.

The same checks through real tracking stores are in :mod:`tracker_core.testing.suite_params`
(run on every leg by ``test_params_suite.py``).
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Literal

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker_core import FineTuningParams, InvalidParamsError
from tracker_core.methods import grid_params, sample_params
from tracker_core.params import MAX_PARAM_KEY_LENGTH, MAX_PARAM_VALUE_LENGTH, SUPPORTED_TYPES
from tracker_core.testing.suite_params import (
    Basic,
    EveryType,
    Level,
    Optimizer,
    Schedule,
    examples,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.frozen
class Legacy(FineTuningParams):
    """The types of the first release: their stored form and ids must not change."""

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


#: text every tracking database stores as it is (no NUL, no lone surrogate)
texts = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200
)
short_texts = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=5
)
floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = floats | st.integers(-(2**63), 2**63)  # ints become floats in float fields

legacy_values = st.fixed_dictionaries(
    {
        "i": st.integers(-(2**53), 2**53),
        "f": floats,
        "b": st.booleans(),
        "s": texts,
        "c": st.sampled_from(Color),
        "lvl": st.sampled_from(Level),
        "xs": st.lists(floats, max_size=4),
        "names": st.lists(short_texts, max_size=4),
        "maybe": st.none() | st.integers(),
        "maybe_s": st.none() | short_texts,
    }
)

schedules = st.builds(
    Schedule,
    kind=st.sampled_from(["cosine", "linear"]),
    warmup_steps=st.integers(),
    milestones=st.lists(floats, max_size=3).map(tuple),
)
every_type = st.builds(
    EveryType,
    lr=numbers,
    epochs=st.integers(),
    freeze=st.booleans(),
    note=texts,
    optimizer=st.sampled_from(Optimizer) | st.sampled_from([o.value for o in Optimizer]),
    level=st.sampled_from(Level),
    mode=st.sampled_from(["fast", "exact"]),
    bits=st.sampled_from([None, 4, 8, 16]),
    layers=st.lists(st.integers(), max_size=4) | st.tuples(st.integers()),
    dropouts=st.lists(numbers, max_size=3).map(tuple) | st.lists(numbers, max_size=3),
    shape=st.tuples(st.integers(), short_texts, st.booleans()),
    weights=st.dictionaries(short_texts, numbers, max_size=3),
    warmup=st.none() | numbers,
    names=st.none() | st.lists(short_texts, max_size=3),
    grid=st.lists(st.lists(st.integers(), max_size=3), max_size=3),
    choices=st.dictionaries(
        short_texts,
        st.tuples(st.sampled_from(Optimizer), st.sampled_from(["a", "b", None])),
        max_size=2,
    ),
    schedule=schedules,
    schedules=st.lists(schedules, max_size=2),
    maybe_schedule=st.none() | schedules,
)


def round_trip(params: FineTuningParams) -> FineTuningParams:
    stored = params.to_mlflow()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in stored.items())
    back = type(params).from_mlflow(stored)
    assert back == params and back.id == params.id
    assert back.to_mlflow() == stored
    return back


# ---------------------------------------------------------------------- round trip
@given(legacy_values)
def test_params_round_trip_through_mlflow_strings(values: dict[str, Any]) -> None:
    back = round_trip(Legacy(**values))
    assert isinstance(back, Legacy)
    assert type(back.i) is int and type(back.f) is float and type(back.b) is bool
    assert isinstance(back.c, Color) and isinstance(back.lvl, Level)


@given(every_type)
def test_every_supported_type_round_trips_exactly(params: EveryType) -> None:
    back = round_trip(params)
    assert isinstance(back, EveryType)
    assert type(back.lr) is float and all(type(x) is float for x in back.dropouts)
    assert type(back.layers) is list and type(back.dropouts) is tuple
    assert type(back.schedule) is Schedule and type(back.schedule.milestones) is tuple
    assert list(back.weights) == list(params.weights)


def test_edge_examples_round_trip() -> None:
    for params in examples():
        round_trip(params)


def test_params_id_is_stable_and_order_independent() -> None:
    a = Legacy(i=1, f=0.5, b=True, s="x", c=Color.RED, lvl=Level.LOW, xs=[1.0], names=["a"])
    b = Legacy(names=["a"], xs=[1.0], lvl=Level.LOW, c=Color.RED, s="x", b=True, f=0.5, i=1)
    assert a.id == b.id
    assert a.id != attrs.evolve(a, f=0.25).id
    assert len(a.id) == 16


# ids and stored strings written by the first release (computed with it): existing runs keep
# their identity, and what it stored still loads
FIRST_RELEASE = [
    (
        Legacy(i=1, f=0.5, b=True, s="x", c=Color.RED, lvl=Level.LOW, xs=[1.0], names=["a"]),
        "b9a55d7ba4578a19",
        '{"params.i": "1", "params.f": "0.5", "params.b": "true", "params.s": "x", '
        '"params.c": "\\"red\\"", "params.lvl": "1", "params.xs": "[1.0]", '
        '"params.names": "[\\"a\\"]", "params.maybe": "null", "params.maybe_s": "null"}',
    ),
    (
        Legacy(
            i=-7,
            f=1e-3,
            b=False,
            s="a, b\nc é",
            c=Color.BLUE,
            lvl=Level.HIGH,
            xs=[],
            names=["", "z"],
            maybe=3,
            maybe_s="q",
        ),
        "e1770c8548659526",
        '{"params.i": "-7", "params.f": "0.001", "params.b": "false", '
        '"params.s": "a, b\\nc \\u00e9", "params.c": "\\"blue\\"", "params.lvl": "2", '
        '"params.xs": "[]", "params.names": "[\\"\\", \\"z\\"]", "params.maybe": "3", '
        '"params.maybe_s": "\\"q\\""}',
    ),
    (
        # the first release stored an int given to a float field as an int: it loads as float
        Legacy(
            i=0,
            f=2.0,
            b=False,
            s="",
            c=Color.RED,
            lvl=Level.LOW,
            xs=[1.0, 2.0],
            names=[],
            maybe_s="",
        ),
        "53f997b0710e3229",
        '{"params.i": "0", "params.f": "2", "params.b": "false", "params.s": "", '
        '"params.c": "\\"red\\"", "params.lvl": "1", "params.xs": "[1, 2]", '
        '"params.names": "[]", "params.maybe": "null", "params.maybe_s": "\\"\\""}',
    ),
]


@pytest.mark.parametrize(("params", "pinned_id", "stored"), FIRST_RELEASE)
def test_ids_and_stored_forms_of_the_first_release_still_hold(
    params: Legacy, pinned_id: str, stored: str
) -> None:
    assert params.id == pinned_id
    assert Legacy.from_mlflow(json.loads(stored)) == params
    assert Legacy.from_mlflow(json.loads(stored)).id == pinned_id


# ---------------------------------------------------------------------- normalisation
def test_an_int_in_a_float_field_is_the_same_params() -> None:
    assert Basic(lr=1) == Basic(lr=1.0)
    assert Basic(lr=1).id == Basic(lr=1.0).id
    assert type(Basic(lr=1).lr) is float
    assert Basic(lr=1).to_mlflow() == Basic(lr=1.0).to_mlflow()
    assert Basic(lr=-0.0).id == Basic(lr=0).id  # -0.0 == 0.0: one value, one run
    a = EveryType(lr=1, dropouts=(0, 1), weights={"a": 2}, warmup=3)
    b = EveryType(lr=1.0, dropouts=(0.0, 1.0), weights={"a": 2.0}, warmup=3.0)
    assert a == b and a.id == b.id and a.to_mlflow() == b.to_mlflow()


def test_numpy_numbers_are_normalised() -> None:
    np = pytest.importorskip("numpy")
    p = EveryType(lr=np.float32(0.5), epochs=np.int64(3), layers=np.array([1, 2]).tolist())
    assert type(p.lr) is float and type(p.epochs) is int
    assert p == EveryType(lr=0.5, epochs=3, layers=[1, 2])
    with pytest.raises(InvalidParamsError, match=r"EveryType\.freeze is declared bool"):
        EveryType(lr=0.5, freeze=np.bool_(True))


def test_enum_field_takes_a_member_or_its_value() -> None:
    assert EveryType(lr=0.1, optimizer="sgd").optimizer is Optimizer.SGD
    assert EveryType(lr=0.1, level=2).level is Level.HIGH
    assert EveryType(lr=0.1, optimizer="sgd").id == EveryType(lr=0.1, optimizer=Optimizer.SGD).id
    for value in ("SGD", True, 1.0, Color.RED, Optimizer):
        field = "level" if value in (True, 1.0) else "optimizer"
        with pytest.raises(InvalidParamsError, match=rf"EveryType\.{field} is declared"):
            EveryType(lr=0.1, **{field: value})


def test_literal_values_are_compared_with_their_type() -> None:
    assert EveryType(lr=0.1, mode="exact", bits=16).bits == 16
    for field, value in (("mode", "slow"), ("bits", 4.0), ("bits", "4"), ("bits", 5)):
        with pytest.raises(InvalidParamsError, match=rf"EveryType\.{field} is declared Literal"):
            EveryType(lr=0.1, **{field: value})

    @attrs.frozen
    class Flags(FineTuningParams):
        on: Literal[1, True]

    assert type(Flags(on=True).on) is bool and type(Flags(on=1).on) is int
    assert Flags(on=True).id != Flags(on=1).id
    round_trip(Flags(on=True))
    round_trip(Flags(on=1))


def test_sequences_are_normalised_to_the_declared_container() -> None:
    p = EveryType(lr=0.1, layers=(1, 2), dropouts=[0.5], shape=[2, "y", True], grid=((1,), ()))
    assert p.layers == [1, 2] and p.dropouts == (0.5,) and p.shape == (2, "y", True)
    assert p.grid == [[1], []]
    assert p == EveryType(
        lr=0.1, layers=[1, 2], dropouts=(0.5,), shape=(2, "y", True), grid=[[1], []]
    )


def test_dict_fields_need_str_keys_and_keep_their_order() -> None:
    a = EveryType(lr=0.1, weights={"b": 1.0, "a": 2.0})
    b = EveryType(lr=0.1, weights={"a": 2.0, "b": 1.0})
    assert a == b and a.id == b.id
    assert list(round_trip(a).weights) == ["b", "a"]  # type: ignore[attr-defined]
    with pytest.raises(InvalidParamsError, match=r"EveryType\.weights\[1\] is 1 \(int\)"):
        EveryType(lr=0.1, weights={1: 1.0})
    with pytest.raises(InvalidParamsError, match=r"EveryType\.weights\['a'\] is 'x'"):
        EveryType(lr=0.1, weights={"a": "x"})


def test_nested_attrs_fields() -> None:
    p = EveryType(lr=0.1, schedule={"kind": "linear", "milestones": [0.5]})  # a mapping
    assert p.schedule == Schedule("linear", 0, (0.5,))
    assert EveryType(lr=0.1, schedule=Schedule(warmup_steps=2)).schedule.warmup_steps == 2
    with pytest.raises(InvalidParamsError, match=r"EveryType\.schedule\.milestones\[0\]"):
        EveryType(lr=0.1, schedule=Schedule(milestones=("x",)))  # type: ignore[arg-type]
    with pytest.raises(InvalidParamsError, match="no field named speed"):
        EveryType(lr=0.1, schedule={"speed": 1})

    @attrs.frozen
    class Sub(Schedule):
        pass

    with pytest.raises(InvalidParamsError, match="a subclass would come back as its base"):
        EveryType(lr=0.1, schedule=Sub())


@attrs.frozen
class Node:
    name: str
    children: list[Node] = attrs.field(factory=list)


@attrs.frozen
class Tree(FineTuningParams):
    root: Node
    inner: Basic | None = None  # params nested in params


def test_recursive_and_nested_params_classes_round_trip() -> None:
    tree = Tree(Node("a", [Node("b"), Node("c", [Node("d")])]), inner=Basic(lr=2))
    back = round_trip(tree)
    assert isinstance(back, Tree) and back.inner == Basic(lr=2.0)
    with pytest.raises(InvalidParamsError, match=r"Tree\.inner\.lr"):
        Tree(Node("a"), inner={"lr": "x"})  # type: ignore[arg-type]


@attrs.frozen
class Private(FineTuningParams):
    _secret_sauce: float = 1.0
    other: int = attrs.field(default=0, alias="renamed")


def test_private_and_aliased_fields_round_trip() -> None:
    round_trip(Private(secret_sauce=2, renamed=3))


def test_str_values_that_databases_cannot_store_are_refused() -> None:
    with pytest.raises(InvalidParamsError, match=r"Basic\.note is declared str.*NUL"):
        Basic(lr=0.1, note="a\x00b")
    with pytest.raises(InvalidParamsError, match=r"Basic\.names\[0\].*surrogate"):
        Basic(lr=0.1, names=["\ud800"])


# ---------------------------------------------------------------------- refusals
WRONG = [
    ("lr", "0.1", "float"),
    ("lr", True, "float"),
    ("lr", None, "float"),
    ("lr", math.nan, "float"),
    ("lr", math.inf, "float"),
    ("lr", 10**400, "float"),
    ("epochs", 1.0, "int"),
    ("epochs", True, "int"),
    ("epochs", "1", "int"),
    ("freeze", 1, "bool"),
    ("freeze", "true", "bool"),
    ("note", 1, "str"),
    ("note", None, "str"),
    ("optimizer", "adagrad", "Optimizer"),
    ("mode", None, "Literal['fast', 'exact']"),
    ("layers", "12", "list[int]"),
    ("layers", [1, 2.5], "list[int]"),
    ("layers", {1, 2}, "list[int]"),
    ("dropouts", 0.1, "tuple[float, ...]"),
    ("shape", (1, "x"), "tuple[int, str, bool]"),
    ("weights", [("a", 1.0)], "dict[str, float]"),
    ("warmup", "none", "float | None"),
    ("schedule", "cosine", "Schedule"),
]


@pytest.mark.parametrize(("field", "value", "declared"), WRONG, ids=lambda x: repr(x)[:20])
def test_wrong_values_refused_naming_class_field_type_and_value(
    field: str, value: Any, declared: str
) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        EveryType(**{"lr": 0.1, field: value})
    message = str(caught.value)
    assert f"EveryType.{field} is declared {declared}, got " in message
    assert repr(value)[:40] in message


def test_huge_int_is_refused_typed() -> None:
    with pytest.raises(InvalidParamsError, match=r"EveryType\.epochs"):
        EveryType(lr=0.1, epochs=10**5000)  # more digits than int -> str converts


def test_values_longer_than_mlflow_keeps_are_refused() -> None:
    assert len(Basic(lr=0.1, note="é" * MAX_PARAM_VALUE_LENGTH).to_mlflow()["params.note"]) == 6000
    with pytest.raises(InvalidParamsError) as caught:
        Basic(lr=0.1, note="x" * (MAX_PARAM_VALUE_LENGTH + 1))
    assert "Basic.note" in str(caught.value) and str(MAX_PARAM_VALUE_LENGTH) in str(caught.value)
    # the limit applies to the stored (JSON) form: 2,000 'é' are 12,000 characters as JSON
    with pytest.raises(InvalidParamsError, match=rf"Basic\.names.*{MAX_PARAM_VALUE_LENGTH}"):
        Basic(lr=0.1, names=["é" * 2000])


def test_limits_match_mlflow() -> None:
    from mlflow.utils import validation

    assert validation.MAX_PARAM_VAL_LENGTH == MAX_PARAM_VALUE_LENGTH
    assert validation.MAX_ENTITY_KEY_LENGTH == MAX_PARAM_KEY_LENGTH


def test_field_name_longer_than_mlflow_keys_is_refused() -> None:
    name = "x" * (MAX_PARAM_KEY_LENGTH - len("params."))
    ok = attrs.make_class("Ok", {name: attrs.field(type=int, default=0)}, (FineTuningParams,))
    round_trip(ok())
    long = attrs.make_class(
        "Long", {name + "x": attrs.field(type=int, default=0)}, (FineTuningParams,)
    )
    with pytest.raises(InvalidParamsError, match=f"at most {MAX_PARAM_KEY_LENGTH}"):
        long()


class TupleValued(enum.Enum):
    A = (1, 2)


@attrs.define
class Mutable:
    x: int = 0


@attrs.frozen(eq=False)
class WithoutEq:
    x: int = 0


@attrs.frozen
class WithInitFalse:
    x: int = attrs.field(default=0, init=False)


UNSUPPORTED: list[Any] = [
    set[int],
    frozenset[str],
    Any,
    object,
    list,
    dict[int, str],
    int | str,
    list[int | str],
    tuple[int, ...] | list[int],
    bytes,
    complex,
    Literal[1.5],
    Literal[Color.RED],
    TupleValued,
    Mutable,
    WithInitFalse,
    WithoutEq,
    dict[str, set[int]],
]


@pytest.mark.parametrize("tp", UNSUPPORTED, ids=repr)
def test_unsupported_types_refused_listing_the_supported_ones(tp: Any) -> None:
    cls = attrs.make_class("Bad", {"field": attrs.field(type=tp)}, (FineTuningParams,))
    with pytest.raises(InvalidParamsError) as caught:
        cls(None)
    message = str(caught.value)
    assert "Bad" in message and "field" in message and SUPPORTED_TYPES in message


def test_from_mlflow_rejects_garbage() -> None:
    good = Legacy(i=1, f=0.5, b=True, s="x", c=Color.RED, lvl=Level.LOW, xs=[], names=[])
    stored = good.to_mlflow()
    for key, text in (
        ("params.i", "not json"),
        ("params.i", '"1"'),
        ("params.i", "1.5"),
        ("params.f", '"0.5"'),
        ("params.f", "NaN"),
        ("params.b", "1"),
        ("params.c", '"purple"'),
        ("params.xs", '{"a": 1}'),
    ):
        with pytest.raises(InvalidParamsError, match=r"Legacy"):
            Legacy.from_mlflow({**stored, key: text})


# ---------------------------------------------------------------------- grid helpers
def test_grid_params_merges_params_that_normalise_to_the_same() -> None:
    grid = grid_params(Basic, lr=[1, 1.0, 2], note=["a"])
    assert grid == [Basic(lr=1.0, note="a"), Basic(lr=2.0, note="a")]
    assert grid_params(EveryType, lr=[0.1], optimizer=["adam", Optimizer.SGD])[1].optimizer is (
        Optimizer.SGD
    )
    assert len(sample_params(Basic, 5, 0, lr=[1, 1.0, 2])) == 2
