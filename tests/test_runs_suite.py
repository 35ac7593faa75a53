"""The shipped suite of run ownership and run endings, on every leg of the backend matrix."""

from tracker_core.testing.suite_runs import *  # noqa: F403
