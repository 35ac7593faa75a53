"""The chaos soak: tracker-core's invariants as measured figures under kills, faults and load.

``python -m chaos`` (``make chaos``) runs the trials and prints the table; see ``chaos/README.md``.
"""
