"""Progress lines for long work (calibration, reconstruction, evaluation): one line on stderr
every few seconds, so a 2-core CI log and a person at a terminal both see it moving."""

from __future__ import annotations

import sys
import time


class Progress:
    """`update(done)` prints done/total, rate and time left at most every `every_s` seconds."""

    def __init__(
        self, total: int, enabled: bool, label: str, every_s: float = 2.0, unit: str = "images"
    ):
        self.total, self.enabled, self.label, self.every_s = total, enabled, label, every_s
        self.unit = unit
        self.start = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        tail = f", {extra}" if extra else ""
        print(
            f"{self.label}: {done}/{self.total} {self.unit}, {rate:.2f}/s, {eta:.0f} s left{tail}",
            file=sys.stderr,
            flush=True,
        )
