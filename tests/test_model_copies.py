"""Nodes after ours that hand sampling a patcher over another copy of the model: ComfyUI's
non-dynamic delegate (hooked conditioning, TorchCompileModel, device selection) is such a clone,
made by `clone(disable_dynamic=True)`, which reloads the model through the patcher's loader.
On a CPU host every patcher is classic, so the same ComfyUI machinery is reached through
`clone(force_deepcopy=True)`. The adapter follows the model onto the copy (its factors copied
there), the output equals the stock chain's, and the base model stays bare."""
from __future__ import annotations

import pytest

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close


class Reloaded:
    """Test node: ComfyUI's own clone onto a reloaded copy of the model."""

    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def make(self, model):
        return (model.clone(force_deepcopy=True),)


@pytest.fixture(scope="module")
def reloaded(host):
    import inspect

    import comfy.model_patcher
    if "force_deepcopy" not in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters:
        pytest.skip("this ComfyUI's ModelPatcher.clone makes no copies of the model (0.3.75)")
    host.nodes.NODE_CLASS_MAPPINGS["LCTestReloaded"] = Reloaded
    tiny_models.write_lora(host.loras / "copies.safetensors",
                           tiny_models.sd_lora_state_dict(host.unet_sd, seed=31, kinds=("attn", "ff")))
    yield "copies.safetensors"
    host.nodes.NODE_CLASS_MAPPINGS.pop("LCTestReloaded", None)


def through_copy(loras: list, base_branch: bool = False) -> dict:
    p = wf.sd(loras, base_branch=base_branch)
    p["copy"] = {"class_type": "LCTestReloaded", "inputs": {"model": p["5"]["inputs"]["model"]}}
    p["5"]["inputs"]["model"] = ["copy", 0]
    return p


def test_adapter_follows_the_model_onto_a_reloaded_copy(fresh, reloaded):
    h = fresh
    lora = reloaded
    stock = h.run(through_copy([wf.stock(lora, 0.8)]))["out"]
    run = h.run(through_copy([wf.ours(lora, 0.8)], base_branch=True))
    assert close(run["out"], stock)
    entries = [e for e in h.lc.STORE.entries() if e.lora == lora]
    assert len(entries) == 2  # the node's entry and its twin on the copy
    a, b = entries
    assert a.model_ref() is not b.model_ref() and set(a.layers) == set(b.layers)
    assert all(x.up.data_ptr() != y.up.data_ptr()
               for p in a.layers for x, y in zip(a.layers[p], b.layers[p], strict=True))
    # the twin's factors are copied into one allocation (lora_cache/arena.py); the node's own,
    # with their home the CPU, stay as they were built
    from lora_cache_loader.lora_cache import low_rank
    blocks = sorted(len({t.untyped_storage().data_ptr() for t in low_rank.tensors_of(e.layers.values())})
                    for e in (a, b))
    assert blocks[0] == 1 and blocks[1] > 1, blocks
    base = h.run(wf.sd([]))["out"]
    assert close(run["base"], base) and not close(base, stock)
    # the copy is gone with the prompt that made it, and its twin with it
    remaining = [e for e in h.lc.STORE.entries() if e.lora == lora]
    assert len(remaining) == 1 and remaining[0] in (a, b)

    # a strength change: the node's entry is reused; the new copy gets its own twin, same output
    stock = h.run(through_copy([wf.stock(lora, 0.5)]))["out"]
    out = h.run(through_copy([wf.ours(lora, 0.5)]))["out"]
    assert h.last_event()["path"] == "fast" and close(out, stock)
