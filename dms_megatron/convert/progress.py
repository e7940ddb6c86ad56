"""Progress of a long conversion for a person: one line at most every ``every_s`` seconds with the share done, the
rate and the time left, and a last line at the end; nothing for work shorter than ``every_s`` or on ranks but 0."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

from dms_megatron.progress import fmt_duration, rate_and_left

GB = 1e9


class ByteProgress:
    def __init__(self, what: str, total_bytes: int, every_s: float = 10.0,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.what, self.total, self.every_s = what, max(1, total_bytes), every_s
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.done, self.t0 = 0, time.time()
        self.last = self.t0  # the first line comes after every_s
        self.quiet = os.environ.get("RANK", "0") != "0"

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.time()
        spoke = self.last > self.t0
        if self.quiet or (now - self.last < self.every_s and not (self.done >= self.total and spoke)):
            return
        self.last = now
        rate, left = rate_and_left(self.done, self.total, now - self.t0)
        self.log(f"{self.what}: {100 * self.done / self.total:.0f}% ({self.done / GB:.2f} / {self.total / GB:.2f} GB), "
                 f"{rate / 1e6:.0f} MB/s, {fmt_duration(left)} left")


__all__ = ["ByteProgress"]
