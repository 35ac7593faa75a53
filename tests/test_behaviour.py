"""The shipped behaviour suite, on the reference leg and one remote leg (every leg with
``--all-legs``, see conftest.py)."""

from tracker_core.testing.suite import *  # noqa: F403
