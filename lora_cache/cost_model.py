"""`auto`: per sampling, the unmerged forward or weights merged for the sampling, whichever
measured faster for this adapter set, latent shape and step count.

Neither form wins everywhere (measured on an H100: unmerged costs SDXL about 30 ms a step
but Flux under 20 ms; a merge plus exact restore costs 50-500 ms once). The costs depend on the
GPU, the model, the adapter's layers and the latent, so they are measured, not guessed: a
sampling's time from ON_PRE_RUN to the end of ON_CLEANUP (merge and restore included), with
the device synchronised at both ends. The first sampling of a key only warms up kernels and
is not counted; then each form is measured once, and the faster one serves from then on,
its time kept as a moving average.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

FORMS = ("dynamic", "merged")


class CostKey(NamedTuple):
    """What a sampling's cost depends on: the adapter set (entry ids), latent shape, step count."""

    adapters: tuple[int, ...]
    shape: tuple[int, ...]
    steps: int


class Choice(NamedTuple):
    form: str
    why: str
_KEYS_KEPT = 256


class CostModel:
    def __init__(self):
        self._seen: OrderedDict[tuple, dict[str, float]] = OrderedDict()
        self._warm: set[tuple] = set()
        self._lock = threading.Lock()

    def choose(self, key: CostKey) -> Choice:
        """The form for the next sampling of `key`, and why."""
        with self._lock:
            if key not in self._warm:
                return Choice("dynamic", "auto: first sampling of this adapter set and shape (warm-up, not measured)")
            seen = self._seen.get(key, {})
            for form in FORMS:
                if form not in seen:
                    return Choice(form, f"auto: measuring {form}")
            best = min(FORMS, key=seen.__getitem__)
            return Choice(best, f"auto: {best} measured faster ({seen['dynamic'] * 1000:.1f} ms dynamic vs "
                          f"{seen['merged'] * 1000:.1f} ms merged per sampling)")

    def record(self, key: CostKey, form: str, seconds: float) -> None:
        with self._lock:
            if key not in self._warm:
                self._warm.add(key)
                return
            seen = self._seen.setdefault(key, {})
            seen[form] = seconds if form not in seen else 0.7 * seen[form] + 0.3 * seconds
            self._seen.move_to_end(key)
            while len(self._seen) > _KEYS_KEPT:
                old, _ = self._seen.popitem(last=False)
                self._warm.discard(old)

    def measured(self) -> list[dict]:
        with self._lock:
            return [{"key": repr(k), **{f"{f}_ms": v * 1000 for f, v in seen.items()}}
                    for k, seen in self._seen.items()]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._warm.clear()


COSTS = CostModel()
