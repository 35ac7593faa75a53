"""The store contracts every backend passes, one test module per side of a backend:

- :mod:`~tracker_core.testing.contract_tracking`: the tracking store (fixture
  ``tracking_backend``), run on every tracking store;
- :mod:`~tracker_core.testing.contract_artifacts`: the artifact store (fixture
  ``artifact_backend``), run on every artifact store.

Each fixture yields a :class:`~tracker_core.testing.harness.BackendUnderTest`. Import the tests
into a test module that defines the fixture(s) of the side(s) a backend implements::

    from tracker_core.testing.contract_artifacts import *  # noqa: F403

or both sides at once::

    from tracker_core.testing.contract import *  # noqa: F403
"""

from __future__ import annotations

from tracker_core.testing import contract_artifacts, contract_tracking
from tracker_core.testing.contract_artifacts import *  # noqa: F403
from tracker_core.testing.contract_tracking import *  # noqa: F403

__all__ = sorted({*contract_artifacts.__all__, *contract_tracking.__all__})
