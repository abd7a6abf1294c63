"""Logging set-up and a progress bar for rank 0.

Rank 0 logs at INFO. Other ranks log warnings and errors only, prefixed with their mesh
coordinates, so a problem on any rank is visible and attributable.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time

_bar: "ProgressBar | None" = None


class _BarAwareHandler(logging.StreamHandler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record):
        bar = _bar
        if bar is not None and bar.enabled:
            bar.clear()
        super().emit(record)
        if bar is not None and bar.enabled:
            bar.render()


def configure_logging(rank: int, label: str) -> None:
    logger = logging.getLogger("microtron")
    logger.handlers.clear()
    handler = _BarAwareHandler(sys.stderr)
    if rank == 0:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.setLevel(logging.INFO)
    else:
        handler.setFormatter(logging.Formatter(f"{label} %(levelname)s %(message)s"))
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


class ProgressBar:
    """A one-line bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool = True):
        global _bar
        self.total = max(total, 1)
        self.enabled = enabled and sys.stderr.isatty()
        self.done = 0
        self.text = ""
        self.start = time.perf_counter()
        _bar = self

    def update(self, done: int, text: str = "") -> None:
        self.done, self.text = done, text
        if self.enabled:
            self.clear()
            self.render()

    def render(self) -> None:
        width = max(10, min(40, shutil.get_terminal_size().columns - 50))
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        sys.stderr.write(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{self.text} eta {eta:.0f}s")
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\033[K")

    def close(self) -> None:
        global _bar
        if self.enabled:
            self.clear()
            sys.stderr.flush()
        _bar = None
