"""The process-wide cache map: one entry per (base model, LoRA file).

An entry outlives workflow runs: it keeps the ComfyUI patches read from the file (for the
full path and the text encoder) and, when the adapter can take the cached path, its factors
per targeted layer, which a sampling activates on those layers (scope.py). Entries die with
their model (weak reference) or when the file changes, and nothing half-built is ever stored.
Where the factors live is the memory owner's business (memory.py); it hears of every entry that
leaves through `on_drop`.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .files import FileIdentity
from .form_base import LayerForm

_uids = itertools.count(1)


@dataclass(eq=False)
class Entry:
    lora: str
    identity: FileIdentity
    model_ref: weakref.ref
    model_id: int
    patches: dict
    factors_made: bool = False  # the factors (or the reason there are none) were worked out
    cache_problem: str | None = None  # why the cached path cannot serve; None if it can
    form_note: str | None = None  # which forms types other than plain LoRA took (adapters.CachedForms.form_note)
    layers: dict[str, tuple[LayerForm, ...]] = field(default_factory=dict)
    live: bool = True
    last_strength: float | None = None  # for the reason string only
    # Where the factors are (memory.py writes these): `home` is the device they were built on.
    home: torch.device | None = None
    resident: bool = True  # on `home` (False: moved to host memory)
    offload_reason: str | None = None
    # Names the entry in what merged copies hold (copies.CopyKey): never reused, unlike id().
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def key(self) -> tuple[int, str]:
        return (self.model_id, self.identity.path)

    @property
    def nbytes(self) -> int:
        # Summed over every factor of a 700-layer model this was most of the node's time on the
        # fast path. The factors' own sizes are kept per `layers` dict (planning replaces it, a
        # move keeps sizes); only forms that derive states as they run are asked each time.
        cached = self.__dict__.get("_bytes")
        if cached is None or cached[0] is not self.layers:
            forms = [f for fs in self.layers.values() for f in fs]
            fixed = sum(t.numel() * t.element_size() for f in forms for t in f.tensors())
            cached = self.__dict__["_bytes"] = (self.layers, fixed, [f for f in forms if hasattr(f, "states")])
        _, fixed, stateful = cached
        return fixed + sum(f.states.nbytes for f in stateful)

    @property
    def device(self) -> str | None:
        for fs in self.layers.values():
            return str(fs[0].device)
        return None

    def modules(self) -> Iterator[tuple[str, torch.nn.Module, tuple[LayerForm, ...]]]:
        model = self.model_ref()
        if model is None:
            return
        # The fast path walks every targeted layer; nn.Module.get_submodule per path per run was
        # most of its time on a 700-layer model. The module tree of a model does not change.
        # Weak references: an entry must not keep its model's layers, and their weights, alive
        # after the model is freed.
        # Kept per `layers` dict: planning the factors replaces it.
        cached = self.__dict__.get("_mods")
        if cached is None or cached[0] is not self.layers:
            cached = self.__dict__["_mods"] = (self.layers,
                                               {p: weakref.ref(model.get_submodule(p)) for p in self.layers})
        mods = cached[1]
        for path, factors in self.layers.items():
            module = mods[path]()
            assert module is not None, "the model, alive here, holds its layers"
            yield path, module, factors


class AdapterStore:
    def __init__(self):
        self._entries: dict[tuple[int, str], Entry] = {}
        # One lock for the map and for the memory owner's state over it (memory.py takes this
        # one): the map calls the owner back on every drop, so two locks could deadlock.
        self.lock = threading.RLock()
        # Bumped on purge and whenever entries move or leave, so ComfyUI re-executes nodes whose
        # cached outputs reference them (the node then reports what happened).
        self.generation = 0
        self.on_drop: list[Callable[[Entry], None]] = []

    def get(self, model: torch.nn.Module, path: str) -> Entry | None:
        with self.lock:
            entry = self._entries.get((id(model), path))
            if entry is not None and entry.model_ref() is not model:
                self._drop(entry)  # id() reused by a new model
                return None
            return entry

    def put(self, entry: Entry) -> None:
        with self.lock:
            old = self._entries.get(entry.key)
            if old is not None and old is not entry:
                self._drop(old)
            model = entry.model_ref()
            if not any(e.model_ref() is model for e in self._entries.values()):
                weakref.finalize(model, self._forget_model, id(model))
            self._entries[entry.key] = entry

    def drop(self, entry: Entry) -> None:
        with self.lock:
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        entry.live = False
        for listener in self.on_drop:
            listener(entry)

    def _forget_model(self, model_id: int) -> None:
        with self.lock:
            for key in [k for k in self._entries if k[0] == model_id]:
                e = self._entries.pop(key)
                e.live = False
                for listener in self.on_drop:
                    listener(e)

    def entries(self) -> list[Entry]:
        with self.lock:
            return list(self._entries.values())

    def bump(self) -> None:
        self.generation += 1

    def purge(self) -> int:
        with self.lock:
            n = len(self._entries)
            for e in list(self._entries.values()):
                self._drop(e)
            self.bump()
            return n


STORE = AdapterStore()
