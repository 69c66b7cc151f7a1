"""The capability checks. The real hosts (ComfyUI 0.3.75 and 0.33.0, on CPU) are capable; a
patcher or host that lacks what the cached path relies on (or runs ComfyUI's dynamic VRAM)
makes the node take ComfyUI's patch path with the reason, and the output still equals the
stock LoraLoader's.

Capabilities are taken away on real ComfyUI objects, for one test only: a subclass of the real
patcher class, an attribute deleted from a real class with monkeypatch, a marker that ComfyUI's
dynamic VRAM leaves on a model. ComfyUI's own loading, patching and sampling run unchanged."""
from __future__ import annotations

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.weight_adapter
import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close

VARIANT = "LCTestPatcherVariant"


class _Missing:
    """A class attribute that reads as absent, as on a patcher class that lacks the method."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        raise AttributeError(self.name)


def _pre_run_without_callbacks(self):
    self.model.current_patcher = self


_VARIANTS = {
    # ComfyUI's torch.compile helper (TorchCompileModel) leaves its APPLY_MODEL wrapper on the patcher.
    "compiled": {},
    # An older or custom patcher without keyed callbacks.
    "no_keyed_callbacks": {"add_callback_with_key": _Missing()},
    # A custom patcher whose pre_run never fires ON_PRE_RUN: the adapter would never activate.
    "pre_run_without_callbacks": {"pre_run": _pre_run_without_callbacks},
}


class PatcherVariant:
    """Test node: a clone of the model patcher whose class is a subclass of the real one with
    one capability changed."""

    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "variant": (sorted(_VARIANTS),)}}

    def make(self, model, variant):
        n = model.clone()
        if variant == "compiled":
            from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper
            set_torch_compile_wrapper(n, backend="eager")
            return (n,)
        n.__class__ = type(f"{type(n).__name__}_{variant}", (type(n),), dict(_VARIANTS[variant]))
        return (n,)


@pytest.fixture(scope="module")
def variant_node(host):
    host.nodes.NODE_CLASS_MAPPINGS[VARIANT] = PatcherVariant
    yield VARIANT
    host.nodes.NODE_CLASS_MAPPINGS.pop(VARIANT, None)


@pytest.fixture(scope="module")
def lora(host):
    tiny_models.write_lora(host.loras / "compat.safetensors",
                           tiny_models.sd_lora_state_dict(host.unet_sd, seed=7, kinds=("attn", "ff")))
    return "compat.safetensors"



@pytest.fixture(scope="module")
def caps(host):
    from lora_cache_loader.lora_cache import capabilities

    return capabilities


@pytest.fixture(autouse=True)
def fresh_capabilities(caps):
    """The host's and patcher classes' capabilities are worked out once per process; a test that
    takes one away (and monkeypatch, which gives it back) must start and end from scratch."""
    caps.forget()
    yield
    caps.forget()


def with_variant(variant: str, lora_nodes: list) -> dict:
    """UNETLoader -> variant node -> LoRA node(s) -> KSampler."""
    p = wf.sd(lora_nodes)
    p["v"] = {"class_type": VARIANT, "inputs": {"model": ["1", 0], "variant": variant}}
    first = "l0" if lora_nodes else "5"
    p[first]["inputs"]["model"] = ["v", 0]
    return p


def loaded_base_patcher():
    return next(lm.model for lm in mm.current_loaded_models
                if lm.model is not None and type(lm.model.model).__name__ == "BaseModel")


def tiny_patcher():
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), load_device=cpu, offload_device=cpu)


def test_real_host_and_patcher_are_capable(fresh, lora, caps):
    h = fresh
    assert caps.host_problem() is None
    assert caps.cached_path_problem(tiny_patcher()) is None
    stock = h.run(wf.sd([wf.stock(lora)]))["out"]
    out = h.run(wf.sd([wf.ours(lora)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build", ev
    assert close(out, stock)
    assert caps.cached_path_problem(loaded_base_patcher()) is None


@pytest.mark.parametrize("variant, words", [
    # dynamo traces the tiny UNet on the first sampling: tens of seconds on 2 cores
    pytest.param("compiled", "compiled with torch.compile", marks=pytest.mark.slow),
    ("no_keyed_callbacks", "has no add_callback_with_key()"),
    ("pre_run_without_callbacks", "overrides pre_run() without ComfyUI's ON_PRE_RUN callbacks"),
])
def test_patcher_lacking_a_capability_takes_full_path(fresh, lora, variant_node, variant, words):
    h = fresh
    stock = h.run(with_variant(variant, [wf.stock(lora, 0.8)]))["out"]
    base = h.run(with_variant(variant, []))["out"]
    assert not close(base, stock)
    # mode "unmerged" asks for the cached path explicitly and still gets the patch path
    out = h.run(with_variant(variant, [wf.ours(lora, 0.8, mode="unmerged")]))["out"]
    ev = h.last_event()
    assert ev["path"] == "full", ev
    assert words in ev["reason"] and ev["reason"].endswith("ComfyUI patch path"), ev
    assert close(out, stock), (variant, (out - stock).abs().max())
    # the same model through a capable patcher is back on the cached path
    out = h.run(wf.sd([wf.ours(lora, 0.8)]))["out"]
    assert h.last_event()["path"] in ("build", "fast") and close(out, stock)


def test_model_patcher_dynamic_class_is_capable(caps, host):
    """Where ComfyUI has dynamic VRAM, its own patcher class says so and has what the cached path
    needs (callbacks fired by its pre_run/cleanup, the load state read). On the CPU its constructor
    hands back a plain ModelPatcher, so the class is probed without construction."""
    cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if cls is None:
        pytest.skip("this ComfyUI has no ModelPatcherDynamic (0.3.75)")
    from lora_cache_loader.lora_cache import load_state
    cpu = torch.device("cpu")
    plain = cls(torch.nn.Linear(4, 4), load_device=cpu, offload_device=cpu)
    assert type(plain) is comfy.model_patcher.ModelPatcher and caps.cached_path_problem(plain) is None
    dynamic = object.__new__(cls)
    assert load_state.is_dynamic(dynamic) and not load_state.is_dynamic(plain)
    assert caps._class_problem(cls) is None


def test_plain_patcher_over_a_dynamic_vram_model_takes_full_path(fresh, lora, monkeypatch):
    """ModelPatcherDynamic leaves its virtual VRAM regions on the model (`dynamic_vbars`); a plain
    patcher of such a model (some custom node's own) must not take the cached path."""
    h = fresh
    stock = h.run(wf.sd([wf.stock(lora)]))["out"]
    model = loaded_base_patcher().model
    monkeypatch.setattr(model, "dynamic_vbars", {torch.device("cpu"): object()}, raising=False)
    out = h.run(wf.sd([wf.ours(lora)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "full" and "managed by dynamic VRAM" in ev["reason"], ev
    assert close(out, stock)


def test_patcher_class_without_a_method_takes_full_path(fresh, lora, monkeypatch, caps):
    h = fresh
    stock = h.run(wf.sd([wf.stock(lora)]))["out"]
    monkeypatch.delattr(comfy.model_patcher.ModelPatcher, "remove_callbacks_with_key")
    caps.forget()
    out = h.run(wf.sd([wf.ours(lora)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "full" and "has no remove_callbacks_with_key()" in ev["reason"], ev
    assert close(out, stock)


def test_host_without_lora_adapter_class_takes_full_path(fresh, lora, monkeypatch, caps):
    h = fresh
    stock = h.run(wf.sd([wf.stock(lora)]))["out"]
    monkeypatch.delattr(comfy.weight_adapter, "LoRAAdapter")
    caps.forget()
    assert caps.host_problem() == "this ComfyUI has no comfy.weight_adapter.LoRAAdapter"
    out = h.run(wf.sd([wf.ours(lora)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "full" and "comfy.weight_adapter.LoRAAdapter" in ev["reason"], ev
    assert close(out, stock)


def test_probes_on_real_patcher_instances(caps, monkeypatch):
    """Checks without a sampling run: each missing piece of state gives its own reason."""
    p = tiny_patcher()
    assert caps.cached_path_problem(p) is None

    clone = p.clone()
    clone.set_additional_models("multigpu", [p.clone()])
    assert caps.cached_path_problem(clone) == "multi-GPU clones sample on other copies of the model"

    q = p.clone()
    del q.model.lowvram_patch_counter
    assert "has no 'lowvram_patch_counter' load state" in caps.cached_path_problem(q)

    r = tiny_patcher()
    del r.backup
    assert caps.cached_path_problem(r) == "the model patcher (ModelPatcher) has no 'backup'"

    # An override that defers to ComfyUI's pre_run through super() keeps the callbacks.
    class Deferring(comfy.model_patcher.ModelPatcher):
        def pre_run(self):
            super().pre_run()

    s = tiny_patcher()
    s.__class__ = Deferring
    assert caps.cached_path_problem(s) is None

    monkeypatch.delattr(comfy.lora, "model_lora_keys_unet")
    caps.forget()
    assert caps.cached_path_problem(tiny_patcher()) == "this ComfyUI has no comfy.lora.model_lora_keys_unet"
