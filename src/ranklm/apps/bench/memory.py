"""Resident memory of the process, polled while a cell runs (the bench's memory columns)."""

from __future__ import annotations

import threading

from ...resources import rss_bytes


class PeakRSS:
    """Peak resident-memory growth over a ``with`` block, polled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20
