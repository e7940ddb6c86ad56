"""Rate and time left of a long job, for the progress lines of every command, and stop signals as an exception
for the steps that must clean up after themselves (no dependencies)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Tuple


def say(message: str) -> None:
    """A progress line on stdout, flushed (under nohup, SLURM or a pipe it must not wait in a buffer)."""
    print(message, flush=True)


def rate_and_left(done: float, total: float, elapsed: float) -> Tuple[float, float]:
    """(units per second, seconds left) after ``done`` of ``total`` units in ``elapsed`` seconds."""
    rate = done / max(elapsed, 1e-9)
    return rate, max(0.0, total - done) / max(rate, 1e-9)


def fmt_duration(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StopRequested(BaseException):
    """A stop signal (SIGTERM) arrived during a step that cleans up on the way out (``stop_raises``). Exit status
    128 + the signal's number, as the shell reports a process that signal killed."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def _handled_by(signals, handler):
    """Within the block ``handler`` handles ``signals``; the previous handlers come back afterwards. Main thread
    only (elsewhere the block runs unchanged: Python delivers signals to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_raises(signals=(signal.SIGTERM,)):
    """Within the block, the given signals raise ``StopRequested`` (so ``finally`` clauses remove partial output)
    instead of killing the process; the previous handlers come back afterwards (main thread only)."""
    def raise_stop(signum, frame):
        raise StopRequested(signum)

    with _handled_by(signals, raise_stop):
        yield


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block the given signals are only recorded; the first one is raised again, to the handler that
    was there before, when the block ends. For setup that an exception half-way would leave half made
    (torch.distributed's store and groups). Main thread only, like ``stop_raises``."""
    pending: list = []
    with _handled_by(signals, lambda signum, frame: pending.append(signum)):
        yield
    if pending:
        signal.raise_signal(pending[0])


__all__ = ["say", "rate_and_left", "fmt_duration", "StopRequested", "stop_raises", "signals_deferred"]
