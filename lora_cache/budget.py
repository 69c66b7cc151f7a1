"""How many bytes of cached factors may stay where, and which adapter leaves first.

Two tiers. The *device* tier is the factors on their model's load device (a GPU in normal
use), limited per device. The *host* tier is factors the cache moved to the CPU to free the
device; beyond its limit the least recently used ones leave memory (the entry is dropped and
rebuilt from the file on next use). The order is a small explicit LRU in the style of
sglang's srt/lora/eviction_policy.py: mark_used / select_victim / remove, plus counters.
Adapters in use by the running sampling are pinned and never selected.

Limits, in MB: the environment variables LORA_CACHE_GPU_BUDGET_MB (device tier, per device)
and LORA_CACHE_CPU_BUDGET_MB (host tier) win; else the ComfyUI setting "LoraCache.GpuBudgetMB"
(Settings dialog, read from the default user's comfy.settings.json); else 10% of the device's
total memory and 10% of system RAM.

Merged copies (copies.py) take what the device has free beside the model's weights and the
sampling; LORA_CACHE_COPY_BUDGET_MB caps them per device (none by default).
"""
from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, NamedTuple, TypeVar

import torch

_MB = 1024 * 1024
DEFAULT_FRACTION = 0.10
SETTING_ID = "LoraCache.GpuBudgetMB"
ENV_DEVICE = "LORA_CACHE_GPU_BUDGET_MB"
ENV_HOST = "LORA_CACHE_CPU_BUDGET_MB"
ENV_COPIES = "LORA_CACHE_COPY_BUDGET_MB"


Key = TypeVar("Key", bound=Hashable)


class LRUPolicy(Generic[Key]):
    """Least recently used first. Keys are cache entries (anything hashable)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()
        self.counters: Counter[str] = Counter()

    def mark_used(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def select_victim(self, candidates: Iterable[Key], pinned: Iterable[Key] = ()) -> Key | None:
        """The least recently used candidate that is not pinned, or None."""
        cand = set(candidates)
        pin = set(pinned)
        for key in self._order:
            if key in cand and key not in pin:
                return key
        # candidates never marked used count as oldest
        for key in cand - pin - set(self._order):
            return key
        return None

    def order(self) -> list[Key]:
        return list(self._order)


_setting_cache: dict = {}


def setting_mb() -> float | None:
    """The ComfyUI setting, from the default user's settings file (re-read when it changes)."""
    try:
        import folder_paths
        path = os.path.join(folder_paths.get_user_directory(), "default", "comfy.settings.json")
        st = os.stat(path)
    except Exception:
        return None
    key = (path, st.st_mtime_ns, st.st_size)
    if _setting_cache.get("key") != key:
        value = None
        try:
            with open(path) as f:
                raw = json.load(f).get(SETTING_ID)
            if raw not in (None, "") and float(raw) > 0:
                value = float(raw)
        except Exception:
            value = None
        _setting_cache.update(key=key, value=value)
    return _setting_cache["value"]


def _env_mb(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if v >= 0 else None


def _total(device: torch.device) -> int:
    import comfy.model_management as mm
    try:
        return int(mm.get_total_memory(device))
    except Exception:
        return 0


class Limit(NamedTuple):
    """A byte limit and where the number comes from (the stats route and the panel show both)."""

    bytes: int
    source: str


class Budget:
    """Byte limits per tier. `overrides` (device string -> bytes) let tests and callers set a
    limit for one device, the CPU included, without touching the environment."""

    def __init__(self) -> None:
        self.overrides: dict[str, int] = {}
        self.host_override: int | None = None
        self.copy_overrides: dict[str, int] = {}

    def device_limit(self, device: torch.device | str) -> Limit:
        d = torch.device(device)
        if str(d) in self.overrides:
            return Limit(self.overrides[str(d)], "set by the caller")
        env = _env_mb(ENV_DEVICE)
        if env is not None:
            return Limit(int(env * _MB), f"{ENV_DEVICE}")
        s = setting_mb()
        if s is not None:
            return Limit(int(s * _MB), f"ComfyUI setting {SETTING_ID}")
        return Limit(int(_total(d) * DEFAULT_FRACTION), f"default: {DEFAULT_FRACTION:.0%} of {d} memory")

    def host_limit(self) -> Limit:
        if self.host_override is not None:
            return Limit(self.host_override, "set by the caller")
        env = _env_mb(ENV_HOST)
        if env is not None:
            return Limit(int(env * _MB), f"{ENV_HOST}")
        return Limit(int(_total(torch.device("cpu")) * DEFAULT_FRACTION),
                     f"default: {DEFAULT_FRACTION:.0%} of system RAM")

    def copy_limit(self, device: torch.device | str) -> Limit | None:
        """The cap on merged copies per device, or None where only free memory limits them."""
        d = str(torch.device(device))
        if d in self.copy_overrides:
            return Limit(self.copy_overrides[d], "set by the caller")
        env = _env_mb(ENV_COPIES)
        if env is not None:
            return Limit(int(env * _MB), ENV_COPIES)
        return None
