"""MLflow search filter strings, built from tracker-core queries.

MLflow's filter language (``mlflow.utils.search_utils``) has quirks this module absorbs:

- keys are quoted with backticks (``params.`lr` = '0.1'``);
- string values take single or double quotes, and there is **no escape**: ``'it\\'s'`` and
  ``'it''s'`` are matched literally, backslashes included, and a trailing backslash inside
  single quotes swallows the closing quote. A value is therefore quoted with whichever quote
  it does not contain, and each clause is checked by parsing it back, between two
  neighbours, with MLflow's own parser. A clause that cannot be expressed (e.g. a value with
  both quote kinds) becomes a local predicate instead;
- only ``run_id`` supports ``IN (...)``; several statuses are expressed as ``status != ...``
  for every *other* status MLflow knows;
- metrics have no ``IS NOT NULL``: "has logged metric m" is ``metrics.`m` >= -DBL_MAX``
  (MLflow stores infinities clamped to +-DBL_MAX and NaN as 0 with a flag, so every logged
  value matches).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tracker_core.stores import ExperimentQuery, RunQuery

__all__ = ["experiment_filter", "quote_key", "quote_value", "run_filter", "run_order_by"]

#: a predicate applied locally to what the server returned
LocalCheck = Callable[[Any], bool]
# MLflow's tokenizer rejects "e+308": write the exponent without its sign
_LOWEST = f"{-sys.float_info.max!r}".replace("e+", "e")


def _equals(getter: Callable[[Any], Any], expected: Any) -> LocalCheck:
    return lambda obj: bool(getter(obj) == expected)


def _entry_equals(
    getter: Callable[[Any], Mapping[str, Any]], key: str, expected: Any
) -> LocalCheck:
    return lambda obj: bool(getter(obj).get(key) == expected)


def _has_key(getter: Callable[[Any], Mapping[str, Any]], key: str) -> LocalCheck:
    return lambda obj: key in getter(obj)


def _absent(getter: Callable[[Any], Any], excluded: Any) -> LocalCheck:
    return lambda obj: bool(getter(obj) != excluded)


def quote_key(key: str) -> str | None:
    """``key`` in backticks, or None if it cannot be quoted (it contains a backtick)."""
    return None if "`" in key else f"`{key}`"


def _parses_back(clause: str, expected: str, experiments: bool) -> bool:
    """Whether ``clause``, between two neighbours, parses back to exactly ``expected``."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.search_utils import SearchExperimentsUtils, SearchUtils

    parser = SearchExperimentsUtils if experiments else SearchUtils
    sentinel = "name = 'x'" if experiments else "attributes.run_name = 'x'"
    try:
        parsed = parser.parse_search_filter(  # type: ignore[no-untyped-call]
            f"{sentinel} AND {clause} AND {sentinel}"
        )
    except MlflowException:
        return False
    return len(parsed) == 3 and parsed[1].get("value") == expected


@functools.lru_cache(maxsize=4096)
def quote_value(prefix: str, value: str, *, experiments: bool = False) -> str | None:
    """The clause ``<prefix> <quoted value>`` (prefix includes the comparator), verified with
    MLflow's own parser in context; None if no quoting round-trips. Remembered: the check
    costs milliseconds of parsing, and a worker searches by the same names and values again
    and again (a run's name at every claim and resume, a model's mark at every prune)."""
    for quote in ("'", '"'):
        if quote in value:
            continue
        clause = f"{prefix} {quote}{value}{quote}"
        if _parses_back(clause, value, experiments):
            return clause
    return None


def _equalities(
    entity: str, items: Mapping[str, str], getter: Callable[[Any], Mapping[str, str]]
) -> tuple[list[str], list[LocalCheck]]:
    clauses: list[str] = []
    local: list[LocalCheck] = []
    for key, value in items.items():
        quoted = quote_key(key)
        clause = quote_value(f"{entity}.{quoted} =", value) if quoted else None
        if clause is None:
            local.append(_entry_equals(getter, key, value))
        else:
            clauses.append(clause)
    return clauses, local


def _status_clauses(statuses: Sequence[str]) -> list[str]:
    from mlflow.entities import RunStatus as MlflowRunStatus

    known = [MlflowRunStatus.to_string(s) for s in MlflowRunStatus.all_status()]
    wanted = {str(s) for s in statuses}
    if not wanted or wanted >= set(known):
        return []
    return [f"attributes.status != '{s}'" for s in known if s not in wanted]


def run_filter(query: RunQuery) -> tuple[str, list[LocalCheck]]:
    """The filter string for ``query`` and the checks the server could not do (on mlflow Runs)."""
    clauses = _status_clauses(query.statuses)
    local: list[LocalCheck] = []
    for entity, items, getter in (
        ("tags", query.tags, lambda run: run.data.tags),
        ("params", query.params, lambda run: run.data.params),
    ):
        more, checks = _equalities(entity, items, getter)
        clauses += more
        local += checks
    if query.run_name is not None:
        clause = quote_value("attributes.run_name =", query.run_name)
        if clause is None:
            local.append(_equals(lambda run: run.info.run_name, query.run_name))
        else:
            clauses.append(clause)
    if query.has_metric is not None:
        key = quote_key(query.has_metric)
        if key is None:
            local.append(_has_key(lambda run: run.data.metrics, query.has_metric))
        else:
            clauses.append(f"metrics.{key} >= {_LOWEST}")
    return " AND ".join(clauses), local


def run_order_by(query: RunQuery) -> list[str] | None:
    """``order_by`` for ``query``: the metric, then MLflow's own tie-break (start time, id)."""
    if query.order_by_metric is None:
        return None
    key = quote_key(query.order_by_metric)
    if key is None:
        raise ValueError(f"cannot order by metric {query.order_by_metric!r}: it has a backtick")
    return [f"metrics.{key} {'ASC' if query.ascending else 'DESC'}"]


def experiment_filter(query: ExperimentQuery) -> tuple[str, list[LocalCheck]]:
    """Filter string for ``query`` and local checks (on mlflow Experiments)."""
    clauses: list[str] = []
    local: list[LocalCheck] = []
    for key, value in query.tags.items():
        quoted = quote_key(key)
        clause = quote_value(f"tags.{quoted} =", value, experiments=True) if quoted else None
        if clause is None:
            local.append(_entry_equals(lambda exp: exp.tags, key, value))
        else:
            clauses.append(clause)
    for name in query.exclude_names:
        clause = quote_value("name !=", name, experiments=True)
        if clause is None:
            local.append(_absent(lambda exp: exp.name, name))
        else:
            clauses.append(clause)
    if query.created_before_ms is not None:
        clauses.append(f"creation_time < {int(query.created_before_ms)}")
    return " AND ".join(clauses), local
