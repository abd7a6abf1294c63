"""Generate text from a checkpoint in any tp x pp layout; see `python scripts/generate.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.generate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
