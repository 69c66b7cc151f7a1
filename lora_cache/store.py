"""The process-wide cache of adapters, one entry per (base model, LoRA file).

An entry outlives workflow runs: it keeps the ComfyUI patches read from the file (for the
full path and the text encoder) and, when the adapter can take the dynamic path, its factors
on the model's device, registered on the targeted layers. Entries die with their model
(weak reference) or when the file changes, and nothing half-built is ever stored.

Memory (budget.py, memory.py): factors beyond the device budget, or of a model ComfyUI
unloaded, are moved to the CPU, least recently used first; beyond the host budget they leave
memory. Entries pinned by the running sampling are never moved or dropped. An entry whose
factors are on the CPU is moved back before its next use (the node reports a build).
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch

from . import layers, memory
from .budget import Budget, LRUPolicy
from .files import FileIdentity

log = logging.getLogger("lora_cache")


@dataclass(eq=False)
class Entry:
    lora: str
    identity: FileIdentity
    model_ref: weakref.ref
    model_id: int
    patches: dict
    plan_reason: str | None = None  # why the dynamic path cannot serve; None if it can
    forms: str | None = None  # which forms types other than plain LoRA took (adapters.Plan.forms)
    layers: dict[str, tuple[layers.LayerFactors, ...]] = field(default_factory=dict)
    live: bool = True
    last_strength: float | None = None  # for the reason string only
    resident: bool = True  # factors on `home` (False: moved to the CPU, see memory.py)
    offload_reason: str | None = None

    @property
    def key(self) -> tuple[int, str]:
        return (self.model_id, self.identity.path)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for fs in self.layers.values() for f in fs)

    @property
    def device(self) -> str | None:
        for fs in self.layers.values():
            return str(fs[0].device)
        return None

    @property
    def home(self) -> torch.device | None:
        """Where the factors belong (the model's load device, where they were built)."""
        return getattr(self, "_home", None)

    def modules(self):
        model = self.model_ref()
        if model is None:
            return
        # The fast path walks every targeted layer; nn.Module.get_submodule per path per run was
        # most of its time on a 700-layer model. The module tree of a model does not change.
        # Weak references: the layers' slots refer to this entry, and a strong cycle would keep
        # the factors alive after the model is freed until the next garbage collection.
        mods = self.__dict__.get("_mods")
        if mods is None:
            mods = self.__dict__["_mods"] = {p: weakref.ref(model.get_submodule(p)) for p in self.layers}
        for path, factors in self.layers.items():
            yield path, mods[path](), factors

    def attach(self) -> None:
        if not self.resident:
            STORE.ensure_resident(self)
        for _, m, f in self.modules():
            layers.register(m, self, f)

    def detach(self) -> None:
        for _, m, _f in self.modules():
            layers.unregister(m, self)
        self.live = False


class AdapterStore:
    def __init__(self):
        self._entries: dict[tuple[int, str], Entry] = {}
        self._lock = threading.RLock()
        # Bumped on purge and eviction so ComfyUI re-executes nodes whose cached outputs
        # reference entries (the node then reports what happened).
        self.generation = 0
        self.policy = LRUPolicy()
        self.budget = Budget()
        self._pins: dict[int, list[Entry]] = {}  # base model id -> entries its sampling uses

    def get(self, model: torch.nn.Module, path: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get((id(model), path))
            if entry is not None and entry.model_ref() is not model:
                self._drop(entry)  # id() reused by a new model
                return None
            if entry is not None:
                self.policy.mark_used(entry)
            return entry

    def put(self, entry: Entry) -> None:
        with self._lock:
            old = self._entries.get(entry.key)
            if old is not None and old is not entry:
                self._drop(old)
            model = entry.model_ref()
            if not any(e.model_ref() is model for e in self._entries.values()):
                weakref.finalize(model, self._forget_model, id(model))
            if entry.layers:
                entry._home = next(iter(entry.layers.values()))[0].device
            self._entries[entry.key] = entry
            entry.attach()
            self.policy.mark_used(entry)
            self._enforce(entry.home, keep=entry)

    def drop(self, entry: Entry) -> None:
        with self._lock:
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self.policy.remove(entry)
        entry.detach()

    def _forget_model(self, model_id: int) -> None:
        with self._lock:
            self._pins.pop(model_id, None)
            for key in [k for k in self._entries if k[0] == model_id]:
                e = self._entries.pop(key)
                self.policy.remove(e)
                e.live = False

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def purge(self) -> int:
        with self._lock:
            n = len(self._entries)
            for e in list(self._entries.values()):
                self._drop(e)
            self._pins.clear()
            self.generation += 1
            return n

    # -- memory: pins, residency, budget --------------------------------------------------

    def pinned(self) -> set:
        return {e for es in self._pins.values() for e in es}

    def pin(self, model_id: int, entries: list[Entry]) -> None:
        """The sampling of model `model_id` uses `entries` now: they are moved back to their
        device if needed and not evicted until `unpin`."""
        with self._lock:
            self._pins[model_id] = list(entries)
            for e in entries:
                self.policy.mark_used(e)
                if not e.resident:
                    self.ensure_resident(e)

    def unpin(self, model_id: int) -> None:
        with self._lock:
            self._pins.pop(model_id, None)

    def ensure_resident(self, entry: Entry) -> None:
        with self._lock:
            if entry.resident or entry.home is None:
                return
            memory.move_factors(entry.layers, to_host=False, home=entry.home)
            entry.resident = True
            entry.offload_reason = None
            self.policy.counters["moved_back"] += 1
            self._enforce(entry.home, keep=entry)

    def offload(self, entry: Entry, reason: str) -> bool:
        with self._lock:
            if not entry.resident or not memory.can_offload(entry.home) or not entry.layers:
                return False
            memory.move_factors(entry.layers, to_host=True, home=entry.home)
            entry.resident = False
            entry.offload_reason = reason
            self.policy.counters["moved_to_cpu"] += 1
            self.generation += 1
            self._enforce_host()
            return True

    def sweep_unloaded(self) -> int:
        """Moves off the device the factors of models ComfyUI no longer holds there.

        ON_DETACH reaches us only through our own patchers; when a patcher without our callback
        (a stock LoRA clone, the loader's own) was the model's last load, ComfyUI's unload calls
        nobody of ours. So the node, the stats route and our callbacks also look at each model's
        load state, the one ComfyUI keeps on the model itself."""
        with self._lock:
            pinned = self.pinned()
            gone = {}
            for e in list(self._entries.values()):
                model = e.model_ref()
                if (model is None or not e.resident or e in pinned or e.home is None
                        or not memory.can_offload(e.home)):
                    continue
                if model.model_loaded_weight_memory == 0 or torch.device(model.device).type != e.home.type:
                    gone[id(e)] = e
            return sum(self.offload(e, "ComfyUI unloaded the model") for e in gone.values())

    def device_bytes(self, device) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.resident and e.home == device)

    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if not e.resident)

    def _evict(self, entry: Entry, why: str) -> None:
        log.info("[LoRA Cache] %s: dropped from memory (%s); it is read again on next use", entry.lora, why)
        self._drop(entry)
        self.policy.counters["dropped"] += 1
        self.generation += 1

    def _enforce(self, device, keep: Entry | None = None) -> None:
        """Least recently used factors leave `device` until it is within budget."""
        if device is None:
            return
        limit, _ = self.budget.device_limit(device)
        while self.device_bytes(device) > limit:
            pinned = self.pinned() | ({keep} if keep is not None else set())
            cands = [e for e in self._entries.values() if e.resident and e.home == device and e.nbytes]
            victim = self.policy.select_victim(cands, pinned)
            if victim is None:
                log.warning("[LoRA Cache] %d bytes of factors on %s in use, over the %d byte budget",
                            self.device_bytes(device), device, limit)
                return
            if not self.offload(victim, f"memory budget of {device} ({limit} bytes)"):
                self._evict(victim, f"memory budget of {device}")

    def _enforce_host(self) -> None:
        limit, _ = self.budget.host_limit()
        while self.host_bytes() > limit:
            cands = [e for e in self._entries.values() if not e.resident]
            victim = self.policy.select_victim(cands, self.pinned())
            if victim is None:
                return
            self._evict(victim, f"cpu budget ({limit} bytes)")

    def memory_stats(self) -> dict:
        with self._lock:
            devices = {}
            for e in self._entries.values():
                if e.home is not None and e.resident:
                    devices.setdefault(str(e.home), 0)
                    devices[str(e.home)] += e.nbytes
            homes = {str(e.home) for e in self._entries.values() if e.home is not None}
            budget = {}
            for d in sorted(homes):
                limit, source = self.budget.device_limit(d)
                budget[d] = {"bytes": devices.get(d, 0), "limit": limit, "source": source}
            limit, source = self.budget.host_limit()
            return {"device": budget, "moved_to_cpu": {"bytes": self.host_bytes(), "limit": limit, "source": source},
                    "counters": dict(self.policy.counters), "pinned": len(self.pinned())}


STORE = AdapterStore()
