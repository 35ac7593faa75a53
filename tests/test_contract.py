"""The shipped store contracts, on every tracking store and every artifact store (see
conftest.py: the ``tracking_backend`` and ``artifact_backend`` fixtures)."""

from tracker_core.testing.contract import *  # noqa: F403
