"""Rate and time left of a long job, for the progress lines of every command (no dependencies)."""

from __future__ import annotations

from typing import Tuple


def rate_and_left(done: float, total: float, elapsed: float) -> Tuple[float, float]:
    """(units per second, seconds left) after ``done`` of ``total`` units in ``elapsed`` seconds."""
    rate = done / max(elapsed, 1e-9)
    return rate, max(0.0, total - done) / max(rate, 1e-9)


def fmt_duration(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


__all__ = ["rate_and_left", "fmt_duration"]
