"""``python -m tracker_core``: the ``tracker-core`` command line."""

import sys

from tracker_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
