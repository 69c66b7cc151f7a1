"""Counts calls of ComfyUI's own methods (weight work, model calls) while still running them."""
from __future__ import annotations

import contextlib
from collections import Counter

import comfy.model_management
import comfy.model_patcher

MP = comfy.model_patcher.ModelPatcher


@contextlib.contextmanager
def count_weight_work(only=None):
    """Counts ModelPatcher.load, weight-restoring unpatch_model, partially_unload/partially_load
    that move weights, patch_weight_to_device that computes a patched weight, and
    LoadedModel.model_unload. With `only` (a BaseModel or text encoder module), counts only the
    work done on that module tree."""
    counts: Counter = Counter()

    def concerns(obj) -> bool:
        if only is None:
            return True
        patcher = obj.model if isinstance(obj, comfy.model_management.LoadedModel) else obj
        return patcher is not None and patcher.model is only
    originals = {}

    def wrap(owner, name, key_fn):
        orig = getattr(owner, name)
        originals[(owner, name)] = orig

        def spy(self, *a, **kw):
            key = key_fn(self, *a, **kw)
            if key and concerns(self):
                counts[key] += 1
            return orig(self, *a, **kw)

        setattr(owner, name, spy)

    wrap(MP, "load", lambda self, *a, **kw: "load")
    wrap(MP, "unpatch_model", lambda self, device_to=None, unpatch_weights=True:
         "unpatch_weights" if unpatch_weights else None)
    wrap(MP, "partially_unload", lambda self, *a, **kw: "partially_unload")
    wrap(MP, "patch_weight_to_device", lambda self, key, *a, **kw: "patch_weight" if key in self.patches else None)
    wrap(comfy.model_management.LoadedModel, "model_unload", lambda self, *a, **kw: "model_unload")
    try:
        yield counts
    finally:
        for (owner, name), orig in originals.items():
            setattr(owner, name, orig)


@contextlib.contextmanager
def count_model_calls():
    """Counts the model calls (a batch through the diffusion model: BaseModel._apply_model, which
    runs inside ComfyUI's APPLY_MODEL wrappers, so a wrapper's second run counts too) while still
    running them."""
    import comfy.model_base

    counts: Counter = Counter()
    orig = comfy.model_base.BaseModel._apply_model

    def spy(self, *a, **kw):
        counts["model_calls"] += 1
        return orig(self, *a, **kw)

    comfy.model_base.BaseModel._apply_model = spy
    try:
        yield counts
    finally:
        comfy.model_base.BaseModel._apply_model = orig
