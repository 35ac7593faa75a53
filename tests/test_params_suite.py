"""The fine-tuning params suite (every supported type through real stores), on every leg."""

from tracker_core.testing.suite_params import *  # noqa: F403
