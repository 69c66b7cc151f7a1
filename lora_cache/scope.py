"""Which sampling or text encoding an adapter is active in.

The node returns a clone of the model patcher (or of the CLIP) that carries the adapters as an
attachment (cloned along by later nodes) and activates them only while ComfyUI runs that
clone:
- diffusion model: ON_PRE_RUN (after ComfyUI loaded the model for sampling) and ON_CLEANUP
  (in the `finally` after it), called on the sampling patcher only;
- text encoder: CLIP has no such callbacks, so a PatcherInjection: ComfyUI injects at the end
  of every load of that patcher (each encode loads it) and ejects when any patcher of the same
  text encoder loads next, is unloaded or is garbage collected.
So the layers run the adapter exactly for a patcher that carries it; any other patcher of the
same base model (another branch, another workflow) finds the layers bare. Nothing here changes
weights or patches, so `patches_uuid` stays the same and ComfyUI never reloads for us.

Activation has an owner (the patcher that activated): ComfyUI copies `is_injected` into
clones, so a clone that never injected may eject (e.g. when it is garbage collected while a
sibling runs); only the owner's eject or cleanup deactivates.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

from comfy.patcher_extension import CallbacksMP, PatcherInjection

from . import files, layers
from .errors import LoraCacheError
from .store import Entry

KEY = "lora_cache"
log = logging.getLogger("lora_cache")


@dataclass
class _Activation:
    owner: weakref.ref
    modules: list


# base module tree id -> what we activated and for whom, so deactivation undoes exactly that.
_active: dict[int, _Activation] = {}


@dataclass(frozen=True)
class AdapterStack:
    """The ordered adapters a patcher carries, with their strengths. Immutable: clones share it."""

    items: tuple[tuple[Entry, float], ...] = ()

    def with_adapter(self, entry: Entry, strength: float) -> "AdapterStack":
        return AdapterStack(self.items + ((entry, strength),))


def stack_of(patcher) -> AdapterStack:
    return patcher.get_attachment(KEY) or AdapterStack()


def carry(patcher, entry: Entry, strength: float):
    """A clone of the diffusion model's `patcher` that activates `entry` on top of what it carries."""
    n = patcher.clone()
    n.set_attachments(KEY, stack_of(patcher).with_adapter(entry, strength))
    for call_type, fn in ((CallbacksMP.ON_PRE_RUN, _on_pre_run), (CallbacksMP.ON_CLEANUP, _on_cleanup)):
        n.remove_callbacks_with_key(call_type, KEY)
        n.add_callback_with_key(call_type, KEY, fn)
    return n


def carry_clip(clip, entry: Entry, strength: float):
    """A clone of `clip` (comfy.sd.CLIP) whose patcher activates `entry` while it is loaded."""
    n = clip.clone()
    p = n.patcher
    p.set_attachments(KEY, stack_of(clip.patcher).with_adapter(entry, strength))
    p.set_injections(KEY, [PatcherInjection(inject=_activate, eject=_release)])
    return n


def _check_current(stack: AdapterStack, model) -> None:
    for entry, _ in stack.items:
        if not entry.live or entry.model_ref() is not model:
            raise LoraCacheError(f"LoRA '{entry.lora}': its cache entry was purged or replaced after "
                                 f"the node ran; queue the prompt again")
        if not files.unchanged(entry.identity):
            raise LoraCacheError(f"LoRA file '{entry.lora}' changed on disk after the node ran; "
                                 f"queue the prompt again to load the new file")


def _activate(patcher) -> None:
    stack = patcher.get_attachment(KEY)
    if not stack or not stack.items:
        return
    model = patcher.model
    _deactivate(id(model))  # a run that never reached cleanup must not stack up
    _check_current(stack, model)
    touched = []
    for entry, strength in stack.items:
        for _, module, factors in entry.modules():
            layers.activate(module, factors, strength)
            touched.append(module)
    _active[id(model)] = _Activation(weakref.ref(patcher), touched)


def _release(patcher) -> None:
    act = _active.get(id(patcher.model))
    if act is not None and act.owner() is patcher:
        _deactivate(id(patcher.model))


def _on_pre_run(patcher) -> None:
    _activate(patcher)
    if patcher.model.model_lowvram and stack_of(patcher).items:
        log.warning("[LoRA Cache] model was loaded partially for this sampling; the adapter runs "
                    "unmerged on top of ComfyUI's lowvram weights (correct, but slower)")


def _on_cleanup(patcher) -> None:
    _release(patcher)


def _deactivate(model_id: int) -> None:
    act = _active.pop(model_id, None)
    for module in act.modules if act is not None else ():
        layers.deactivate(module)


def active_owner(model) -> object | None:
    """The patcher whose adapters are active on `model` now, if any (for tests and stats)."""
    act = _active.get(id(model))
    return act.owner() if act is not None else None
