"""The cache entry for (model, LoRA file): reused while the file is unchanged, else built from
the file through ComfyUI's loading and stored. Nothing is stored until the build succeeded."""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

import torch

import comfy.utils

from . import adapters
from .files import FileIdentity
from .memory import MEMORY
from .store import STORE, Entry


class Found(NamedTuple):
    entry: Entry
    how: str  # "cached", "first use", "file changed on disk (...)"


def device_dtype(patcher, patches: dict | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the layers compute: the factors are stored that way.

    A diffusion model says its compute dtype; a text encoder (manual_cast ops) computes in the
    dtype its layers hold, so the first patched layer's weight dtype is taken there."""
    model = patcher.model
    dtype = getattr(model, "manual_cast_dtype", None)
    if dtype is None and hasattr(model, "get_dtype"):
        dtype = model.get_dtype()
    if dtype is None:
        for target in patches or ():
            try:
                dtype = comfy.utils.get_attr(model, adapters.target_key(target)).dtype
                break
            except AttributeError:
                continue
    return patcher.load_device, dtype or torch.float32


def _plan(entry: Entry, patcher) -> None:
    """The factors for the cached path on the patcher's load device, with a progress bar (a large
    adapter's build shows in the UI); or the reason the adapter cannot take that path."""
    if not entry.patches:
        return
    pbar = comfy.utils.ProgressBar(max(len(entry.patches), 1))
    device, dtype = device_dtype(patcher, entry.patches)
    plan = adapters.plan_dynamic(entry.patches, patcher, entry.lora, device, dtype,
                                 progress=lambda done: pbar.update_absolute(done))
    entry.plan_reason = plan.reason
    if plan.layers:
        entry.layers = plan.layers
        entry.home = device


def entry_for(patcher, lora: str, ident: FileIdentity, patches_of: Callable[[], dict]) -> Found:
    """The current entry for (the patcher's model, the file). `patches_of()` reads the file's
    patches for this side; it is called only when an entry must be built."""
    model = patcher.model
    entry = STORE.get(model, ident.path)
    if entry is not None and entry.identity == ident and entry.live:
        MEMORY.used(entry)
        return Found(entry, "cached")
    how = "first use" if entry is None else f"file changed on disk ({entry.identity.describe()} -> {ident.describe()})"
    new = Entry(lora=lora, identity=ident, model_ref=weakref.ref(model), model_id=id(model), patches=patches_of())
    _plan(new, patcher)  # may raise: nothing is stored until it returned
    if entry is not None:
        STORE.drop(entry)
    STORE.put(new)
    MEMORY.admit(new)
    return Found(new, how)
