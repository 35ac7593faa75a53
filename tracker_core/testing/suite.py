"""The behaviour suite every backend passes: the seed's API and DESIGN.md's invariants.

Each test takes the ``backend`` fixture (a :class:`~tracker_core.testing.harness.BackendUnderTest`).
Import the tests into a test module that defines that fixture::

    from tracker_core.testing.suite import *  # noqa: F403

The suite is one module per concept, each of which can also be imported on its own:

- :mod:`~tracker_core.testing.suite_models`: the best model survives (invariant 1), serving;
- :mod:`~tracker_core.testing.suite_runs`: runs resume and end as they should (invariant 2);
- :mod:`~tracker_core.testing.suite_leases`: one worker trains a run at a time (invariant 2);
- :mod:`~tracker_core.testing.suite_iterations`: iterations, the initial model, safe cleanup
  (invariant 3);
- :mod:`~tracker_core.testing.suite_metrics`: nothing lost or counted twice (invariant 5);
- :mod:`~tracker_core.testing.suite_errors`: loud typed failures, one retry policy, no global
  state, interoperability (invariants 4-6);
- :mod:`~tracker_core.testing.suite_params`: typed params round-trip through the store;
- :mod:`~tracker_core.testing.suite_reconcile`: gc and verify find what crashes leave;
- :mod:`~tracker_core.testing.suite_promotion`: champion and challenger, cleanup keeps the
  champion's files, promotion is crash-safe (invariant 3);
- :mod:`~tracker_core.testing.suite_quiet`: tracker-core's calls print nothing;
- :mod:`~tracker_core.testing.suite_search`: the search policy's history and resume, pruned
  runs.

Capabilities (``BackendUnderTest.capabilities``) gate what only some backends do:
``"mlflow"``, plain MLflow reads what we wrote; ``"processes"``, the stores are shared by
separate processes. Every shipped backend has both.
"""

from __future__ import annotations

from tracker_core.testing import (
    suite_errors,
    suite_iterations,
    suite_leases,
    suite_metrics,
    suite_models,
    suite_params,
    suite_promotion,
    suite_quiet,
    suite_reconcile,
    suite_runs,
    suite_search,
)
from tracker_core.testing.suite_errors import *  # noqa: F403
from tracker_core.testing.suite_iterations import *  # noqa: F403
from tracker_core.testing.suite_leases import *  # noqa: F403
from tracker_core.testing.suite_metrics import *  # noqa: F403
from tracker_core.testing.suite_models import *  # noqa: F403
from tracker_core.testing.suite_params import *  # noqa: F403
from tracker_core.testing.suite_promotion import *  # noqa: F403
from tracker_core.testing.suite_quiet import *  # noqa: F403
from tracker_core.testing.suite_reconcile import *  # noqa: F403
from tracker_core.testing.suite_runs import *  # noqa: F403
from tracker_core.testing.suite_search import *  # noqa: F403
from tracker_core.testing.support import clock, mgr  # noqa: F401

_MODULES = (
    suite_errors,
    suite_iterations,
    suite_leases,
    suite_metrics,
    suite_models,
    suite_params,
    suite_promotion,
    suite_quiet,
    suite_reconcile,
    suite_runs,
    suite_search,
)

#: the tests (and the ``mgr`` and ``clock`` fixtures they share); helpers live in
#: tracker_core.testing.support
__all__ = sorted(
    {name for module in _MODULES for name in module.__all__ if name.startswith("test_")}
    | {"clock", "mgr"}
)
