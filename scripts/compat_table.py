"""Rewrite the compatibility table in README.md from `training.compat`.

    python scripts/compat_table.py           # rewrite the block between the compat-table markers
    python scripts/compat_table.py --check   # exit 1 if the block is stale

tests/test_compat.py fails while the block is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.compat import markdown_table  # noqa: E402

START, END = "<!-- compat-table:start -->", "<!-- compat-table:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the block is current")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the file to rewrite")
    args = parser.parse_args(argv)

    path = Path(args.readme)
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(text):
        print(f"error: {path} has no block between {START} and {END}", file=sys.stderr)
        return 2
    updated = pattern.sub(lambda _: f"{START}\n{markdown_table()}\n{END}", text)
    if args.check:
        if updated != text:
            print(f"{path}: the compatibility table is stale; run python scripts/compat_table.py")
            return 1
        return 0
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
