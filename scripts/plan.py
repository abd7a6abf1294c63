"""Rank the layouts of a model on a cluster by predicted step time; see `python scripts/plan.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
