"""Convert Hugging Face GPT-2 folders to checkpoints and back; see `python scripts/convert.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.convert_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
