"""The shipped behaviour suite, run on every leg of the backend matrix (see conftest.py)."""

from tracker_core.testing.suite import *  # noqa: F403
