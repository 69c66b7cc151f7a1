"""Python's garbage collections while a benchmark runs: their total time since the last reset,
and when each full (oldest-generation) one started and how long it took. A full collection
traces every object of the process (a quarter of a second with ComfyUI loaded)."""
from __future__ import annotations

import gc
import time


class GcWatch:
    def __init__(self) -> None:
        self.ms = 0.0
        self.full: list[tuple[float, float]] = []  # (time.perf_counter() at its start, ms it took)
        self._start = 0.0
        gc.callbacks.append(self._on)

    def reset(self) -> None:
        self.ms, self.full = 0.0, []

    def full_after(self, t0: float) -> list[tuple[int, float]]:
        """Each full collection since the reset: (ms after `t0` it started, ms it took)."""
        return [(round((start - t0) * 1000.0), round(took, 1)) for start, took in self.full]

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = (time.perf_counter() - self._start) * 1000.0
        self.ms += took
        if info.get("generation") == 2:
            self.full.append((self._start, took))
