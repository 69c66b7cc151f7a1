"""Whether this ComfyUI host, and the model patcher the node was given, let the cached path
run safely. Every check looks at features (attributes, methods, what a method does), never at
a version string: ComfyUI forks and custom patchers (GGUF, Nunchaku, multi-GPU) ship their own
classes, and the same version can run with or without dynamic VRAM.

`cached_path_problem(patcher)` returns a reason string (shown in the node's event) or None.
What holds for ComfyUI's library and for a patcher class is worked out once and kept; only the
facts of the patcher and model at hand are looked at on every execution.
docs/compat.md says which ComfyUI behaviour each check stands for.
"""
from __future__ import annotations

import functools
import inspect
import weakref

import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.patcher_extension
import comfy.weight_adapter
import torch

from . import load_state

# What the cached path calls on the patcher it is given (service, scope, decision).
_PATCHER_METHODS = ("clone", "get_attachment", "set_attachments", "add_callback_with_key",
                    "remove_callbacks_with_key", "pre_run", "cleanup", "model_size")
# What decision.py reads to tell fast / build / full; ComfyUI's ModelPatcher.__init__ sets the
# model's ones.
_PATCHER_ATTRS = ("patches_uuid", "backup", "load_device")
_MODEL_ATTRS = ("model_lowvram", "model_loaded_weight_memory", "lowvram_patch_counter",
                "current_weight_patches_uuid", "device")
# ComfyUI's sampling runs `pre_run()` after loading and `cleanup()` in its `finally`; the
# adapter is active exactly in between, through these callbacks.
_CALLBACKS = (("pre_run", "ON_PRE_RUN"), ("cleanup", "ON_CLEANUP"))


@functools.cache
def host_problem() -> str | None:
    """What the cached path needs from ComfyUI's library, whatever the patcher."""
    callbacks = getattr(comfy.patcher_extension, "CallbacksMP", None)
    for _, name in _CALLBACKS:
        if not hasattr(callbacks, name):
            return f"this ComfyUI has no patcher callback {name}"
    for module, names in ((comfy.lora, ("load_lora", "model_lora_keys_unet", "model_lora_keys_clip")),
                          (comfy.lora_convert, ("convert_lora",))):
        for name in names:
            if not callable(getattr(module, name, None)):
                return f"this ComfyUI has no {module.__name__}.{name}"
    for name in ("WeightAdapterBase", "LoRAAdapter"):
        if not isinstance(getattr(comfy.weight_adapter, name, None), type):
            return f"this ComfyUI has no comfy.weight_adapter.{name}"
    return None


def _runs_callbacks(cls: type, method: str, call_type: str) -> bool:
    """Does `<cls>.<method>()` still fire ComfyUI's callbacks of `call_type`?

    True for ComfyUI's own method (most custom patchers inherit it), and for an override whose
    source fires the callbacks itself or defers to ComfyUI's through super()."""
    fn = getattr(cls, method, None)
    stock = getattr(comfy.model_patcher.ModelPatcher, method, None)
    if fn is not None and fn is stock:
        return True
    src = _source(fn)
    return call_type in src or f"super().{method}(" in src


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _foreign_dynamic_model(patcher) -> bool:
    # A model that dynamic VRAM manages carries its virtual VRAM regions; its layers then cast
    # their weights through comfy-aimdo whoever loads them, which only ModelPatcherDynamic
    # keeps consistent. A plain patcher over such a model is some custom node's own.
    if load_state.is_dynamic(patcher):
        return False
    model = getattr(patcher, "model", None)
    return bool(getattr(model, "dynamic_vbars", None)) or bool(getattr(model, "dynamic_patchers", None))


# Models whose blocks ComfyUI captures as CUDA graphs under dynamic VRAM (a few text encoders):
# the replay reuses whatever the forward did at capture time. Worked out once per model.
_graph_captured: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def _captures_graphs(model) -> bool:
    if model not in _graph_captured:
        _graph_captured[model] = any(getattr(m, "graph_dynamic_vbar_blocks", False) for m in model.modules())
    return _graph_captured[model]


def _compiled(patcher) -> bool:
    """torch.compile (ComfyUI's TorchCompileModel) traces the layers' forwards once; a forward
    installed per sampling would go unseen or force recompiles."""
    get = getattr(patcher, "get_wrappers", None)
    apply_model = getattr(comfy.patcher_extension.WrappersMP, "APPLY_MODEL", None)
    return bool(callable(get) and apply_model is not None and get(apply_model, "torch.compile"))


def layer_problem(path: str, module: torch.nn.Module) -> str | None:
    """Why a targeted layer's compute would not see an adapter applied in its forward."""
    weight = getattr(module, "weight", None)
    if weight is not None and type(weight).__name__ == "QuantizedTensor":
        # ComfyUI multiplies some quantized weights in fused kernels that call no forward
        # (comfy.ops.linear_input_act), and their cast path differs per layout.
        return f"layer {path} has a quantized weight ({getattr(weight, 'layout_type', 'quantized')})"
    return None


_class_problems: dict[type, str | None] = {}


def forget() -> None:
    """Drops what was worked out about the host and patcher classes (tests take a capability
    away from the running host and give it back)."""
    host_problem.cache_clear()
    _class_problems.clear()


def _class_problem(cls: type) -> str | None:
    """What the patcher class lacks (methods, callbacks fired by its pre_run/cleanup); kept per class."""
    if cls not in _class_problems:
        kind = cls.__name__
        problem = None
        for name in _PATCHER_METHODS:
            if not callable(getattr(cls, name, None)):
                problem = f"the model patcher ({kind}) has no {name}()"
                break
        else:
            for method, call_type in _CALLBACKS:
                if not _runs_callbacks(cls, method, call_type):
                    problem = f"the model patcher ({kind}) overrides {method}() without ComfyUI's {call_type} callbacks"
                    break
        _class_problems[cls] = problem
    return _class_problems[cls]


def cached_path_problem(patcher) -> str | None:
    """Why the cached path cannot be made safe for this patcher on this host, or None."""
    problem = host_problem() or _class_problem(type(patcher))
    if problem is not None:
        return problem
    kind = type(patcher).__name__
    if _foreign_dynamic_model(patcher):
        return (f"the model patcher ({kind}) is not ComfyUI's dynamic-VRAM patcher, but the model's "
                f"weights are managed by dynamic VRAM")
    if _compiled(patcher):
        return "the model is compiled with torch.compile"
    for name in _PATCHER_ATTRS:
        if not hasattr(patcher, name):
            return f"the model patcher ({kind}) has no '{name}'"
    model = patcher.model
    for name in _MODEL_ATTRS:
        if not hasattr(model, name):
            return f"the model ({type(model).__name__}) has no '{name}' load state"
    multi = getattr(patcher, "get_additional_models_with_key", None)
    if getattr(patcher, "is_multigpu_base_clone", False) or (callable(multi) and multi("multigpu")):
        return "multi-GPU clones sample on other copies of the model"
    if load_state.is_dynamic(patcher) and _captures_graphs(model):
        return "ComfyUI replays this model's blocks as CUDA graphs under dynamic VRAM"
    return None
