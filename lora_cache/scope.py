"""Which sampling an adapter is active in.

The node returns a clone of the model patcher that carries the adapters as an attachment
(cloned along by later nodes) and two callbacks under our key. ComfyUI calls ON_PRE_RUN
after it has loaded the model for sampling and ON_CLEANUP in a `finally` after it, on the
sampling patcher only. So the layers run the adapter exactly while a patcher that carries it
samples; any other patcher of the same base model (another branch, another workflow) finds
the layers bare. Nothing here changes weights or patches, so `patches_uuid` stays the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy.patcher_extension import CallbacksMP

from . import files, layers, memory
from .errors import LoraCacheError
from .store import STORE, Entry

KEY = "lora_cache"
log = logging.getLogger("lora_cache")

# base model id -> modules we activated, so cleanup undoes exactly that.
_active: dict[int, list] = {}


@dataclass(frozen=True)
class AdapterStack:
    """The ordered adapters a patcher carries, with their strengths. Immutable: clones share it."""

    items: tuple[tuple[Entry, float], ...] = ()

    def with_adapter(self, entry: Entry, strength: float) -> "AdapterStack":
        return AdapterStack(self.items + ((entry, strength),))


def stack_of(patcher) -> AdapterStack:
    return patcher.get_attachment(KEY) or AdapterStack()


def carry(patcher, entry: Entry, strength: float):
    """A clone of `patcher` that activates `entry` on top of what it already carries."""
    n = patcher.clone()
    n.set_attachments(KEY, stack_of(patcher).with_adapter(entry, strength))
    for call_type, fn in ((CallbacksMP.ON_PRE_RUN, _on_pre_run), (CallbacksMP.ON_CLEANUP, _on_cleanup),
                          (CallbacksMP.ON_DETACH, memory.on_detach)):
        n.remove_callbacks_with_key(call_type, KEY)
        n.add_callback_with_key(call_type, KEY, fn)
    return n


def _on_pre_run(patcher) -> None:
    stack = patcher.get_attachment(KEY)
    if not stack or not stack.items:
        return
    model = patcher.model
    _deactivate(id(model))  # a sampling that never reached cleanup must not stack up
    for entry, _ in stack.items:
        if not entry.live or entry.model_ref() is not model:
            raise LoraCacheError(f"LoRA '{entry.lora}': its cache entry was purged or replaced after "
                                 f"the node ran; queue the prompt again")
        if not files.unchanged(entry.identity):
            raise LoraCacheError(f"LoRA file '{entry.lora}' changed on disk after the node ran; "
                                 f"queue the prompt again to load the new file")
    STORE.pin(id(model), [e for e, _ in stack.items])  # never evicted while sampling; moved back if needed
    touched = []
    for entry, strength in stack.items:
        for _, module, factors in entry.modules():
            layers.activate(module, factors, strength)
            touched.append(module)
    _active[id(model)] = touched
    if model.model_lowvram:
        log.warning("[LoRA Cache] model was loaded partially for this sampling; the adapter runs "
                    "unmerged on top of ComfyUI's lowvram weights (correct, but slower)")


def _on_cleanup(patcher) -> None:
    _deactivate(id(patcher.model))
    STORE.unpin(id(patcher.model))


def _deactivate(model_id: int) -> None:
    for module in _active.pop(model_id, ()):
        layers.deactivate(module)
