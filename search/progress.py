"""Progress lines for long work: one line per event, to stderr, flushed (readable in logs and terminals)."""

from __future__ import annotations

import sys
import time

__all__ = ["log", "duration", "Eta"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Eta:
    """Elapsed time and the estimate of what is left, from the mean time per finished unit."""

    def __init__(self, total: int, timeout: float | None = None) -> None:
        self.total, self.timeout, self.start = total, timeout, time.perf_counter()

    def __call__(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        if self.timeout is not None:
            left = min(left, max(0.0, self.timeout - elapsed)) if done else self.timeout - elapsed
        eta = duration(left) if left == left else "?"
        return f"{done}/{self.total} trials, {duration(elapsed)} elapsed, ETA {eta}"
