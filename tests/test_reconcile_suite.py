"""The shipped reconcile suite (gc and verify), run on every leg of the backend matrix."""

from tracker_core.testing.suite_reconcile import *  # noqa: F403
