"""The shipped "quiet by default" suite on the backend matrix (tests/conftest.py)."""

from tracker_core.testing.suite_quiet import *  # noqa: F403
