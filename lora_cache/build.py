"""The cache entry for (model, LoRA file): reused while the file is unchanged, else read from the
file through ComfyUI's loading and stored with its patches. Its factors are made only when the
cached path is to serve it (`make_factors`), so ComfyUI's own patch path costs nothing extra;
factors that fail take the entry out again, so nothing half-built stays cached."""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import NamedTuple

import comfy.utils
import torch

from . import adapters, capabilities, low_rank
from .arena import Arena
from .errors import LoraCacheError
from .files import FileIdentity
from .memory import MEMORY
from .store import STORE, Entry

log = logging.getLogger("lora_cache")


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


def make_factors(entry: Entry, patcher) -> None:
    """The factors for the cached path on the patcher's load device, with a progress bar (a large
    adapter's build shows in the UI); or the reason the adapter cannot take that path. Raises on
    factors that cannot belong to the layers, after taking the entry out of the cache."""
    if entry.factors_made:
        return
    try:
        _make_factors(entry, patcher)
    except BaseException:
        STORE.drop(entry)
        raise
    entry.factors_made = True
    if entry.layers:
        MEMORY.gather(entry, patcher)
        MEMORY.admit(entry)


def _make_factors(entry: Entry, patcher) -> None:
    if not entry.patches:
        return
    pbar = comfy.utils.ProgressBar(max(len(entry.patches), 1))
    device, dtype = device_dtype(patcher, entry.patches)
    found = adapters.cached_forms(entry.patches, patcher, entry.lora, device, dtype,
                                  progress=lambda done: pbar.update_absolute(done))
    entry.cache_problem = found.reason
    entry.form_note = found.form_note
    if not found.layers:
        return
    model = patcher.model
    for path in found.layers:
        problem = capabilities.layer_problem(path, model.get_submodule(path))
        if problem is not None:
            entry.cache_problem = problem
            return
    entry.layers = found.layers
    entry.home = device


def entry_for(patcher, lora: str, ident: FileIdentity, patches_of: Callable[[], dict]) -> Found:
    """The current entry for (the patcher's model, the file). `patches_of()` reads the file's
    patches for this side; it is called only when an entry must be made."""
    model = patcher.model
    entry = STORE.get(model, ident.path)
    if entry is not None and entry.identity == ident and entry.live:
        MEMORY.used(entry)
        return Found(entry, "cached")
    how = "first use" if entry is None else f"file changed on disk ({ident.change_from(entry.identity)})"
    new = Entry(lora=lora, identity=ident, model_ref=weakref.ref(model), model_id=id(model), patches=patches_of())
    if entry is not None:
        STORE.drop(entry)
    STORE.put(new)
    return Found(new, how)


def twin(entry: Entry, patcher) -> Entry:
    """`entry`'s adapter on the model object of `patcher`, another copy of the same model.

    Nodes after ours may hand sampling a patcher over a reloaded copy of the model: ComfyUI's
    non-dynamic delegate for hooked conditioning, a deep-copied clone, a model for another device.
    The factors are copied onto that patcher's load device for the same layers of the copy; the
    twin is stored like any entry and dies with its model."""
    model = patcher.model
    found = STORE.get(model, entry.identity.path)
    if found is not None and found.identity == entry.identity and found.live:
        MEMORY.used(found)
        return found
    device = patcher.load_device
    # one block for the twin's factors, as for every entry on a device (arena.py)
    place = Arena(low_rank.tensors_of(entry.layers.values()), device)
    twin_layers = {}
    for path, module, factors in entry.modules():
        try:
            other = model.get_submodule(path)
        except AttributeError:
            other = None
        shape = getattr(getattr(module, "weight", None), "shape", None)
        if other is None or type(other) is not type(module) or getattr(other.weight, "shape", None) != shape:
            raise LoraCacheError(f"LoRA '{entry.lora}': a node after the LoRA Cache Loader replaced the model "
                                 f"with one whose layer {path} differs; place that node before the LoRA Cache Loader")
        twin_layers[path] = low_rank.copy_layer(factors, place)
    new = Entry(lora=entry.lora, identity=entry.identity, model_ref=weakref.ref(model), model_id=id(model),
                patches=entry.patches, cache_problem=entry.cache_problem, layers=twin_layers, home=device,
                last_strength=entry.last_strength, factors_made=True)
    if found is not None:
        STORE.drop(found)
    STORE.put(new)
    MEMORY.admit(new)
    log.info("[LoRA Cache] %s: sampling runs on another copy of the model (%s on %s); factors copied onto it",
             entry.lora, type(model).__name__, device)
    return new
