"""Which fine-tuning methods a service offers, by the name a task gives (``fine_tuning_method``).

Two sources: the installed entry points of the group ``tracker_core.methods`` (the normal way:
a method is a distribution that declares one), and ``--method NAME=module:attr`` settings (a
method that is just a module on the path). A setting shadows an entry point of the same name.
Names are checked without importing anything; a method is imported only when it is needed
(to describe it, to ask it for a batch id, to run it), and then cached.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import threading
from typing import Any

import attrs

from tracker_core.errors import ConfigurationError
from tracker_core.methods import METHOD_GROUP, FineTuningMethod, load_method

__all__ = ["MethodInfo", "MethodRegistry"]

log = logging.getLogger(__name__)


@attrs.frozen
class MethodInfo:
    """What the API tells about an offered method."""

    name: str
    source: str
    plugin_name: str | None = None
    main_metric: str | None = None
    is_loss: bool | None = None
    error: str | None = None
    proposal: str | None = None
    search_space: dict[str, Any] | None = None
    search: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "plugin_name": self.plugin_name,
            "main_metric": self.main_metric,
            "is_loss": self.is_loss,
            "direction": None
            if self.is_loss is None
            else ("minimize" if self.is_loss else "maximize"),
            "proposal": self.proposal,
            "search_space": self.search_space,
            "search": self.search,
            "error": self.error,
        }


class MethodRegistry:
    """The methods of one service process. Thread-safe; loaded methods are cached."""

    def __init__(self, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self._extra = dict(extra)
        self._lock = threading.Lock()
        self._loaded: dict[str, FineTuningMethod[Any]] = {}

    def _entry_points(self) -> list[str]:
        return sorted({ep.name for ep in importlib.metadata.entry_points(group=METHOD_GROUP)})

    def names(self) -> list[str]:
        return sorted(set(self._entry_points()) | set(self._extra))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._extra or name in self._entry_points())

    def spec(self, name: str) -> str:
        """What :func:`tracker_core.methods.load_method` takes for ``name``."""
        if name in self._extra:
            return self._extra[name]
        if name in self._entry_points():
            return name
        raise ConfigurationError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        installed = ", ".join(self.names()) or "none"
        return (
            f"unknown fine_tuning_method {name!r}; installed: {installed} (a method is an "
            f"entry point of the group {METHOD_GROUP!r}, or a --method NAME=module:attr setting)"
        )

    def load(self, name: str) -> FineTuningMethod[Any]:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
        method = load_spec(self.spec(name))
        with self._lock:
            return self._loaded.setdefault(name, method)

    def describe(self) -> list[MethodInfo]:
        out: list[MethodInfo] = []
        for name in self.names():
            source = (
                f"--method {self._extra[name]}"
                if name in self._extra
                else f"entry point {METHOD_GROUP}"
            )
            try:
                method = self.load(name)
                search = _search_info(method)
            except Exception as exc:  # a broken plug-in is listed with its error
                out.append(MethodInfo(name, source, error=f"{type(exc).__name__}: {exc}"))
                continue
            out.append(
                MethodInfo(
                    name,
                    source,
                    method.name,
                    method.main_metric,
                    bool(method.is_loss),
                    proposal=method.proposal,
                    **search,
                )
            )
        return out

    def check_proposal(self, name: str, proposal: str | None, max_runs: int | None) -> None:
        """Raise :class:`ConfigurationError` (naming the rule) unless the method can choose
        its params sets by ``proposal`` with ``max_runs`` (a search needs a search space)."""
        from tracker_core.finetune.plan import method_policy

        method_policy(self.load(name), proposal, max_runs)


def _search_info(method: FineTuningMethod[Any]) -> dict[str, Any]:
    """The method's search space and how it is searched (None for both without a space)."""
    from tracker_core.finetune.plan import method_policy
    from tracker_core.search import Search

    if method.search_space is None and (method.search is None or method.search.space is None):
        return {}
    policy = method_policy(method, Search.name)
    assert isinstance(policy, Search) and policy.space is not None
    return {
        "search_space": policy.space.to_json(),
        "search": {
            "max_runs": policy.max_runs,
            "sampler": type(policy.make_sampler(0)).__name__,
            "pruner": type(policy.pruner).__name__ if policy.pruner is not None else None,
            "intermediate_metric": policy.intermediate_metric or method.main_metric,
        },
    }


def load_spec(spec: str) -> FineTuningMethod[Any]:
    """:func:`load_method`, with ``module:attr`` paths also resolved from the current folder
    (as ``tracker-core run`` does)."""
    if ":" in spec and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return load_method(spec)
