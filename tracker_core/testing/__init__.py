"""Test helpers for tracker-core and its backends (real servers as subprocesses)."""
