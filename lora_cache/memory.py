"""Where cached factors live, and the one place that moves them.

An entry's factors are on their home device (the model's load device, where they were built),
in host memory (pinned when the home is CUDA) after the budget or an unload of ComfyUI's moved
them, or dropped (the entry leaves the cache and is rebuilt from its file on next use). The
memory owner keeps the byte budget per tier (budget.py), the LRU order of eviction, the
entries pinned by the sampling now running, and follows ComfyUI's unloads:

- ComfyUI calls a patcher's ON_DETACH callbacks whenever it detaches the model: at a load of
  another patcher of the same model (weights stay) and when it unloads it (free_memory,
  unload_all_models, POST /free). Every patcher the node returns carries `on_detach`.
- ON_DETACH reaches us only through our own patchers; when a patcher without our callback (a
  stock LoRA clone, the loader's own) was the model's last load, ComfyUI's unload calls nobody
  of ours, so the node also sweeps at each execution (`sweep_unloaded`).

Merged copies (copies.py) are counted here too: a sampling may build them only in memory the
device has free (read as ComfyUI reads it) beside the model's weights and what the sampling
needs (`copy_budget`), and they are the first to give way: before a sampling that lacks its
minimum memory, on an out-of-memory error, when ComfyUI unloads their model, when their adapter
leaves the cache. Under dynamic VRAM comfy-aimdo would evict the model's resident weights for
any allocation beyond that, so copies never take what the weights use.

Reading (`stats`) never moves anything.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from typing import TypeGuard

import comfy.model_management as mm
import torch

from . import copies, load_state, low_rank
from .arena import PIECE, Arena
from .budget import Budget, LRUPolicy
from .store import STORE, AdapterStore, Entry

log = logging.getLogger("lora_cache")
_MB = 1024 * 1024

HOST = torch.device("cpu")


def can_offload(home: torch.device | None) -> TypeGuard[torch.device]:
    """Whether factors on `home` can move to host memory (so `home` is a device, not None).

    Factors that live on the CPU (a --cpu model) have nowhere cheaper to go, so they are never
    "moved to the CPU". The test kit replaces this module attribute to run the path a GPU takes
    on a CPU-only host (lora_cache_testkit/cpu_device.py), so callers look it up at call time."""
    return home is not None and torch.device(home).type != "cpu"


def _hand_back(device, freed: int) -> None:
    """Under dynamic VRAM, after our tensors left `device`: torch keeps the freed blocks cached
    (its own allocator in segments, cudaMallocAsync in the driver's pool), where comfy-aimdo
    cannot place weights, so they go back to the driver. ComfyUI's soft_empty_cache would also
    collect IPC handles; with cudaMallocAsync, ComfyUI's default allocator on NVIDIA (its
    cuda_malloc.py), either waits for the whole device first."""
    if freed and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def move_factors(entry: Entry, to_host: bool) -> None:
    """Moves every layer's factors of `entry` in place (low_rank.move_layer: the objects the layers
    hold stay the same, a shared down projection moves as one), into one allocation on their home
    (from the host, or on it, after a build made them one tensor at a time), or into pieces of
    host memory (arena.py)."""
    # Callers move only entries with factors (ensure_resident, offload, gather), which have a home.
    assert entry.home is not None, f"{entry.lora}: no factors to move"
    home = torch.device(entry.home)
    dest = HOST if to_host else home
    pin = to_host and home.type == "cuda" and torch.cuda.is_available()
    # asynchronous where ComfyUI copies so (not on MPS, XPU, DirectML, nor with --deterministic)
    queued = home.type == "cuda" and mm.device_supports_non_blocking(home)
    place = Arena(low_rank.tensors_of(entry.layers.values()), dest, pin, piece=PIECE if to_host else None,
                  non_blocking=queued)
    for fs in entry.layers.values():
        low_rank.move_layer(fs, place)
    if queued:  # every copy of the entry queued on the stream: one wait for all
        torch.cuda.current_stream(home).synchronize()


@dataclass(frozen=True)
class DeviceUse:
    bytes: int
    limit: int
    source: str


class Memory:
    """The memory owner over one cache map (the process-wide STORE)."""

    def __init__(self, store: AdapterStore):
        self.store = store
        self.policy: LRUPolicy[Entry] = LRUPolicy()
        self.budget = Budget()
        self._pins: dict[int, list[Entry]] = {}  # base model id -> entries its sampling uses
        # device -> bytes merged copies may take there since a sampling ran out of memory
        self.copy_caps: dict[str, int] = {}
        self._lock = store.lock
        store.on_drop.append(self._forget)

    # -- the cache map's events ---------------------------------------------------------------

    def _forget(self, entry: Entry) -> None:
        with self._lock:
            self.policy.remove(entry)
            for pinned in self._pins.values():
                if entry in pinned:
                    pinned.remove(entry)
            copies.REGISTRY.drop_where(lambda held: entry.uid in held.entries)

    def admit(self, entry: Entry) -> None:
        """A new entry was stored with its factors on their home: it is the most recently used,
        and older ones may have to leave the device for it."""
        with self._lock:
            self.policy.mark_used(entry)
            self._enforce(entry.home, keep=entry)

    def gather(self, entry: Entry, patcher) -> None:
        """Right after a build on a device: its factors, made one tensor at a time, into one
        allocation there, as every later move places them. Under dynamic VRAM the blocks the build
        freed go back to the driver, where comfy-aimdo can place weights."""
        with self._lock:
            if not entry.layers or not can_offload(entry.home):
                return
            try:
                move_factors(entry, to_host=False)
            except torch.OutOfMemoryError:
                # the block comes before the tensors it replaces leave: where it does not fit, the
                # factors stay as they were made (the Arena allocates before it moves anything)
                log.info("[LoRA Cache] %s: factors kept one tensor at a time (no room for one block of %d "
                         "bytes on %s)", entry.lora, entry.nbytes, entry.home)
                return
            if load_state.is_dynamic(patcher):
                _hand_back(entry.home, entry.nbytes)

    def used(self, entry: Entry) -> None:
        with self._lock:
            self.policy.mark_used(entry)

    # -- pins and residency ---------------------------------------------------------------

    def pinned(self) -> set[Entry]:
        with self._lock:
            return {e for es in self._pins.values() for e in es}

    def pin(self, model_id: int, entries: list[Entry]) -> None:
        """The sampling of model `model_id` uses `entries` now: they are not moved off or evicted
        until `unpin`. Factors moved off come back with `bring_back`, after `leave_room` moved off
        the ones the sampling does not use."""
        with self._lock:
            self._pins[model_id] = list(entries)
            for e in entries:
                self.policy.mark_used(e)

    def reattach(self, entry: Entry, patcher) -> None:
        """At the node, for an adapter whose factors were moved off: on the classic patcher they
        come back now, so that ComfyUI's load for the sampling counts them; under dynamic VRAM at
        the sampling's start (`bring_back`), after the factors it does not use left the device,
        since comfy-aimdo keeps fewer weights resident for whatever else is there."""
        with self._lock:
            self.policy.mark_used(entry)  # the last one the host budget would drop meanwhile
            if not load_state.is_dynamic(patcher):
                self.ensure_resident(entry)

    def bring_back(self, entries: list[Entry]) -> None:
        for e in entries:
            self.ensure_resident(e)

    def unpin(self, model_id: int) -> None:
        with self._lock:
            self._pins.pop(model_id, None)

    def ensure_resident(self, entry: Entry) -> None:
        with self._lock:
            if entry.resident or entry.home is None:
                return
            move_factors(entry, to_host=False)
            entry.resident = True
            entry.offload_reason = None
            self.policy.counters["moved_back"] += 1
            self._enforce(entry.home, keep=entry)

    def offload(self, entry: Entry, reason: str) -> bool:
        with self._lock:
            if not entry.resident or not can_offload(entry.home) or not entry.layers:
                return False
            move_factors(entry, to_host=True)
            entry.resident = False
            entry.offload_reason = reason
            self.policy.counters["moved_to_cpu"] += 1
            self.store.bump()
            self._enforce_host()
            return True

    def sweep_unloaded(self) -> int:
        """Moves off the device the factors of models ComfyUI no longer holds there, and drops
        their merged copies."""
        with self._lock:
            copies.REGISTRY.drop_models(lambda model, device: model is None
                                        or not load_state.holds(model, torch.device(device)))
            pinned = self.pinned()
            gone = [e for e in self.store.entries()
                    if e.resident and e not in pinned and can_offload(e.home)
                    and (model := e.model_ref()) is not None and not load_state.holds(model, e.home)]
            return sum(self.offload(e, "ComfyUI unloaded the model") for e in gone)

    # -- giving way to sampling -----------------------------------------------------------

    def _give_way(self, device, reason: str, need: int | None = None, keep: Iterable[Entry] = ()) -> int:
        """Moves factors that no running sampling uses (nor `keep`) off `device`, least recently
        used first, until `need` bytes left it (all of them when None). Returns the bytes moved."""
        with self._lock:
            freed = 0
            pinned = self.pinned() | set(keep)
            while need is None or freed < need:
                cands = [e for e in self.store.entries() if e.resident and e.home == device and e.nbytes]
                victim = self.policy.select_victim(cands, pinned)
                if victim is None:
                    break
                freed += victim.nbytes
                if not self.offload(victim, reason):
                    self._evict(victim, reason)
            return freed

    @staticmethod
    def _sampling_need(patcher, shape: tuple[int, ...] | None) -> int:
        """The least memory a sampling of `shape` needs: ComfyUI's estimate for the latent plus
        its inference reserve."""
        need = mm.minimum_inference_memory()
        if shape is not None:
            need += int(patcher.model.memory_required([shape[0], *shape[1:]]))
        return need

    @staticmethod
    def _weights_missing(patcher) -> int:
        """Bytes of the model's weights not on its device now, which its sampling will want
        there: under dynamic VRAM what comfy-aimdo has not made resident, on a partial load
        what ComfyUI left offloaded."""
        if load_state.is_dynamic(patcher):
            return max(0, patcher.model_size() - patcher.loaded_size())
        model = patcher.model
        return max(0, patcher.model_size() - model.model_loaded_weight_memory) if model.model_lowvram else 0

    def _coming_back(self, model_id: int, device) -> int:
        """Bytes of the factors the sampling of model `model_id` uses that are off `device` now
        and come back for it."""
        with self._lock:
            return sum(e.nbytes for e in self._pins.get(model_id, ()) if not e.resident and e.home == device)

    def leave_room(self, patcher, shape: tuple[int, ...] | None, keep: Collection[int] = ()) -> None:
        """Before a sampling, after ComfyUI loaded the model: the least memory the sampling needs
        comes before merged copies it does not use (other models', and this model's on layers
        other than `keep`, module ids), then before cached factors that it does not use. Under
        dynamic VRAM comfy-aimdo evicts weights for new allocations but never our tensors, so
        ours give way first: where the model's weights stream (they do not all fit), unused
        copies and factors leave the device."""
        device = patcher.load_device
        if shape is None or torch.device(device).type == "cpu":
            return
        need = self._sampling_need(patcher, shape)
        coming = self._coming_back(id(patcher.model), device)
        short = need + self._weights_missing(patcher) + coming - mm.get_free_memory(device)
        if short <= 0:
            return
        freed = copies.REGISTRY.drop_where(lambda held: held.device == str(torch.device(device))
                                           and held.module_id not in keep)
        if freed:
            log.info("[LoRA Cache] %d bytes of merged copies this sampling does not use dropped on %s: it needs "
                     "the room", freed, device)
        dynamic = load_state.is_dynamic(patcher)
        if freed >= short or not can_offload(device):
            if dynamic:
                _hand_back(device, freed)
            return
        if dynamic:
            # Weights that do not fit beside the sampling stream in at every step: there each byte
            # of factors this sampling does not use costs a byte of weights streamed per step.
            moved = self._give_way(device, f"the model streams its weights on {device} (dynamic VRAM)")
            _hand_back(device, freed + moved)
        else:
            moved = self._give_way(device, f"sampling needs {need / _MB:.0f} MB on {device}", short - freed)
        if moved:
            log.info("[LoRA Cache] %d bytes of cached factors not used by this sampling moved off %s to leave "
                     "room for it", moved, device)

    def copy_budget(self, patcher, shape: tuple[int, ...] | None, held: int) -> tuple[int, str]:
        """Bytes of merged copies the sampling of `patcher` may hold on its device, and what
        limits them (the reason shown where not every copy fits): the memory free now, as
        ComfyUI reads it, and what the copies on the sampling's layers hold already (`held`:
        kept or replaced), less the model's weights not yet on the device and what the sampling
        needs."""
        device = patcher.load_device
        with self._lock:
            room = mm.get_free_memory(device) + held - self._sampling_need(patcher, shape) \
                - self._weights_missing(patcher)
            budget, why = max(0, room), (f"the rest do not fit in the memory free on {device} beside the model's "
                                         f"weights and the sampling")
            limit = self.budget.copy_limit(device)
            if limit is not None and limit.bytes < budget:
                budget = limit.bytes
                why = f"copies are capped at {limit.bytes / _MB:.0f} MB on {device} ({limit.source})"
            cap = self.copy_caps.get(str(device))
            if cap is not None and cap < budget:
                budget, why = cap, (f"copies are held to {cap / _MB:.0f} MB on {device} since a sampling ran out "
                                    f"of memory there")
            return budget, why

    def _shed_copies(self, device, reason: str) -> int:
        """Drops every merged copy on `device` (out of memory while sampling) and holds later
        samplings there to half of what they held. Returns the bytes."""
        with self._lock:
            held = copies.REGISTRY.bytes(device)
            freed = copies.REGISTRY.drop_where(lambda h: h.device == str(torch.device(device)))
            if held:
                self.copy_caps[str(torch.device(device))] = held // 2
                log.warning("[LoRA Cache] %s: %d bytes of merged copies dropped on %s; later samplings there "
                            "hold at most half of that", reason, freed, device)
            return freed

    def free_after_oom(self, patcher, keep: Iterable[Entry]) -> int:
        """The device ran out of memory while `patcher` sampled: every merged copy on its device
        goes (`_shed_copies`), then cached factors there that no running sampling uses, nor
        `keep`. Returns the bytes freed (0: nothing of ours was left to give way)."""
        device = patcher.load_device
        why = "the device ran out of memory while sampling"
        freed = self._shed_copies(device, why)
        freed += self._give_way(device, why, keep=keep)
        if freed:
            log.warning("[LoRA Cache] out of memory while sampling: %d bytes of merged copies and unused cached "
                        "factors freed on %s; sampling again", freed, device)
        return freed

    # -- the budget -----------------------------------------------------------------------

    def device_bytes(self, device) -> int:
        return sum(e.nbytes for e in self.store.entries() if e.resident and e.home == device)

    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self.store.entries() if not e.resident)

    def _evict(self, entry: Entry, why: str) -> None:
        log.info("[LoRA Cache] %s: dropped from memory (%s); it is read again on next use", entry.lora, why)
        self.store.drop(entry)
        self.policy.counters["dropped"] += 1
        self.store.bump()

    def _enforce(self, device, keep: Entry | None = None) -> None:
        """Least recently used factors leave `device` until it is within budget."""
        if device is None:
            return
        limit, _ = self.budget.device_limit(device)
        while self.device_bytes(device) > limit:
            pinned = self.pinned() | ({keep} if keep is not None else set())
            cands = [e for e in self.store.entries() if e.resident and e.home == device and e.nbytes]
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
            cands = [e for e in self.store.entries() if not e.resident]
            victim = self.policy.select_victim(cands, self.pinned())
            if victim is None:
                return
            self._evict(victim, f"cpu budget ({limit} bytes)")

    def stats(self) -> dict:
        """Bytes, limits and counters as they are now. Moves nothing."""
        with self._lock:
            entries = self.store.entries()
            devices: dict[str, DeviceUse] = {}
            for home in sorted({str(e.home) for e in entries if e.home is not None}):
                limit, source = self.budget.device_limit(home)
                used = sum(e.nbytes for e in entries if e.resident and str(e.home) == home)
                devices[home] = DeviceUse(used, limit, source)
            limit, source = self.budget.host_limit()
            return {"device": {d: asdict(u) for d, u in devices.items()},
                    "moved_to_cpu": {"bytes": self.host_bytes(), "limit": limit, "source": source},
                    "copies": {d: {"bytes": copies.REGISTRY.bytes(d), "layers": copies.REGISTRY.count(d)}
                               for d in sorted(copies.REGISTRY.devices())},
                    "counters": dict(self.policy.counters), "pinned": len(self.pinned())}


MEMORY = Memory(STORE)


def on_detach(patcher, unpatch_all: bool) -> None:
    """ComfyUI's ON_DETACH (any load or unload touching a model of ours): factors of models that
    left their device leave it too."""
    n = MEMORY.sweep_unloaded()
    if n:
        log.info("[LoRA Cache] model unloaded by ComfyUI: factors of %d cached adapters moved to cpu", n)
