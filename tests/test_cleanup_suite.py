"""The shipped suite of safe cleanup, on every leg of the backend matrix."""

from tracker_core.testing.suite_cleanup import *  # noqa: F403
