"""Layers ComfyUI computes without calling their forward (lora_cache/reach.py) on the CPU host.

Newer ComfyUI's `comfy.ops.linear_input_act` (fp16 accumulation, fp16 activations, CUDA) takes
an MLP's down-projection weight from `comfy.ops.cast_bias_weight` and multiplies by it in a
kernel of its own: the layer's forward, where the adapter rides, is never called. A test node
makes the tiny UNet compute one feed-forward's down-projection that way (F.linear standing in
for the kernel). The sampling's first model call finds that layer, serves it through ComfyUI's
cast from then on and runs again; every output equals the stock loader's, and the sampling's
event says how many layers the net served. A layer whose cast cannot carry the adapter goes to
ComfyUI's patches. Where every layer is reached through its forward, nothing runs twice."""
from __future__ import annotations

import pytest
import torch

from lora_cache_testkit import fused as fz
from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.spies import count_model_calls

DOWN = fz.DOWN  # the layer computed without its forward


class FusedDownProjection:
    """Test node: the model's feed-forward at `path` computes its down-projection without calling
    the layer's forward (lora_cache_testkit.fused); `own_cast`: through a cast of its own."""

    CATEGORY = "_test"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "path": ("STRING", {"default": fz.FF}),
                             "own_cast": ("BOOLEAN", {"default": False})}}

    def apply(self, model, path, own_cast):
        fz.fuse(model.model.diffusion_model, path, own_cast)
        return (model,)


@pytest.fixture(scope="module")
def fused_node(host):
    host.nodes.NODE_CLASS_MAPPINGS["LCTestFusedDownProjection"] = FusedDownProjection
    yield
    host.nodes.NODE_CLASS_MAPPINGS.pop("LCTestFusedDownProjection", None)


@pytest.fixture(scope="module")
def reach_loras(host):
    """A LoRA on the attention and feed-forward Linears, and the same LoRA without the factors
    of the layer the test node computes without its forward."""
    sd = tiny_models.sd_lora_state_dict(host.unet_sd, seed=71)
    tiny_models.write_lora(host.loras / "reach_a.safetensors", sd)
    missing = fz.without_layer(sd)
    assert len(missing) == len(sd) - 3  # up, down, alpha
    tiny_models.write_lora(host.loras / "reach_a_missing.safetensors", missing)
    return "reach_a.safetensors", "reach_a_missing.safetensors"


def fused(prompt: dict, own_cast: bool = False) -> dict:
    """`prompt` with the test node between the model loader and everything it fed."""
    for node in prompt.values():
        if node["inputs"].get("model") == ["1", 0]:
            node["inputs"]["model"] = ["fz", 0]
    prompt["fz"] = {"class_type": "LCTestFusedDownProjection",
                    "inputs": {"model": ["1", 0], "path": fz.FF, "own_cast": own_cast}}
    return prompt


def run_counted(h, prompt: dict) -> tuple[dict, int]:
    with count_model_calls() as calls:
        out = h.run(prompt)
    return out, calls["model_calls"]


def sampling(h) -> dict:
    return h.lc.stats()["samplings"][-1]


def bare(module: torch.nn.Module) -> bool:
    """Nothing of ours left on the layer: ComfyUI's forward and no weight function."""
    return "forward" not in module.__dict__ and not module.weight_function


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
def test_a_layer_computed_without_its_forward_is_served_through_comfyuis_cast(fresh, fused_node, reach_loras,
                                                                             mode):
    """auto (merged copies on the CPU host) and dynamic (unmerged): the first sampling finds
    exactly the fused layer, serves it through ComfyUI's cast and runs its first model call once
    more; the output equals stock's, which the layer's adapter visibly changes; the next sampling
    serves it that way from its start and calls the model as often as stock; afterwards the
    layers are bare and the branch without the adapter gets the base model's output."""
    h = fresh
    a, a_missing = reach_loras
    stock, stock_calls = run_counted(h, fused(wf.sd([wf.stock(a, 0.9)])))
    missing = h.run(fused(wf.sd([wf.stock(a_missing, 0.9)])))["out"]
    # without that layer's adapter the output is another: a net that missed it would show
    assert not close(missing, stock["out"])
    base = h.run(fused(wf.sd([])))["out"]

    out, calls = run_counted(h, fused(wf.sd([wf.ours(a, 0.9, mode=mode)])))
    s = sampling(h)
    assert close(out["out"], stock["out"]), mode
    assert s["net"] == 1, s
    assert f"1 layers not reached through their forward ({DOWN}): served through ComfyUI's cast" in s["reason"], s
    assert "the first model call ran again" in s["reason"]
    assert calls == stock_calls + 1, (calls, stock_calls)

    entry = next(e for e in h.lc.STORE.entries() if e.lora == a and e.layers)
    modules = dict((p, m) for p, m, _ in entry.modules())
    assert DOWN in modules and all(bare(m) for m in modules.values())
    assert modules[DOWN].lora_cache_slot.bypassed
    assert sum(m.lora_cache_slot.bypassed for m in modules.values()) == 1

    stock43, stock_calls43 = run_counted(h, fused(wf.sd([wf.stock(a, 0.9)], seed=43)))
    out43, calls43 = run_counted(h, fused(wf.sd([wf.ours(a, 0.9, mode=mode)], seed=43)))
    s = sampling(h)
    assert close(out43["out"], stock43["out"]) and calls43 == stock_calls43, (calls43, stock_calls43)
    assert s["net"] == 1 and "1 layers served through ComfyUI's cast (weight update)" in s["reason"], s
    assert "ran again" not in s["reason"]
    assert all(bare(m) for m in modules.values())
    out = h.run(fused(wf.sd([wf.ours(a, 0.5, mode=mode)], base_branch=True)))
    assert torch.equal(out["base"], base)


def test_every_layer_reached_through_its_forward_runs_each_model_call_once(fresh, reach_loras):
    """The tiny UNet as ComfyUI builds it: the probe finds every adapted layer reached through its
    forward, the sampling calls the model exactly as often as stock's, and its event names no
    layer served another way."""
    h = fresh
    a, _ = reach_loras
    for mode in ("auto", "unmerged"):
        stock, stock_calls = run_counted(h, wf.sd([wf.stock(a, 0.9)]))
        out, calls = run_counted(h, wf.sd([wf.ours(a, 0.9, mode=mode)]))
        s = sampling(h)
        assert close(out["out"], stock["out"]) and calls == stock_calls, (mode, calls, stock_calls)
        assert s["net"] == 0 and "ComfyUI's cast" not in s["reason"], s
        entry = next(e for e in h.lc.STORE.entries() if e.lora == a and e.layers)
        assert not any(m.lora_cache_slot.bypassed for _, m, _ in entry.modules())


def test_a_layer_whose_cast_cannot_carry_the_adapter_goes_to_comfyuis_patches(fresh, fused_node, reach_loras):
    """The fused layer with a cast of its own ops class: ComfyUI's cast cannot carry the adapter,
    so the sampling runs again with the adapter in ComfyUI's patches (event `full` with the
    reason), equal to stock's. A later node execution on the same model puts it there before the
    model loads: nothing runs twice."""
    h = fresh
    a, _ = reach_loras
    stock, stock_calls = run_counted(h, fused(wf.sd([wf.stock(a, 0.9)]), own_cast=True))
    h.lc.events.clear()
    out, calls = run_counted(h, fused(wf.sd([wf.ours(a, 0.9)]), own_cast=True))
    assert close(out["out"], stock["out"])
    # the first model call found it; then the whole sampling ran with ComfyUI's patches
    assert calls == stock_calls + 1, (calls, stock_calls)
    full = [e for e in h.events() if e["path"] == "full"]
    assert len(full) == 1 and full[0]["lora"] == a, h.events()
    assert "without calling their forward" in full[0]["reason"], full[0]

    stock2, stock_calls2 = run_counted(h, fused(wf.sd([wf.stock(a, 0.7)]), own_cast=True))
    h.lc.events.clear()
    out2, calls2 = run_counted(h, fused(wf.sd([wf.ours(a, 0.7)]), own_cast=True))
    assert close(out2["out"], stock2["out"]) and calls2 == stock_calls2, (calls2, stock_calls2)
    assert any(e["path"] == "full" and "without calling their forward" in e["reason"] for e in h.events())
