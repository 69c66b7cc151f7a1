"""Merged and auto mode through the node on the CPU host: merged mode merges the cached factors in
place for each sampling (lora_cache/merge.py) and restores the weights bit-exactly; `auto` picks
the measured-faster form per sampling; no model reload in either."""
from __future__ import annotations

import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.spies import count_weight_work


@pytest.fixture(scope="module")
def merge_loras(host):
    names = []
    for name, seed, kinds in (("mm_a", 41, ("attn", "ff", "conv")), ("mm_b", 42, ("attn",))):
        tiny_models.write_lora(host.loras / f"{name}.safetensors",
                               tiny_models.sd_lora_state_dict(host.unet_sd, seed=seed, kinds=kinds))
        names.append(f"{name}.safetensors")
    return names


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def entry_of(h, lora):
    return next(e for e in h.lc.STORE.entries() if e.lora == lora and e.layers)


@pytest.mark.slow
def test_merged_toggles_restore_weights_bit_exactly(fresh, merge_loras):
    """50 runs toggling merged mode on and off (two stacked adapters, LoCon convolutions
    included): every output equals stock's, every weight after every run equals the original
    bit for bit, and ComfyUI never reloads the model."""
    h = fresh
    a, b = merge_loras
    stock = h.run(wf.sd([wf.stock(a, 0.9), wf.stock(b, -0.6)]))["out"]
    base = h.run(wf.sd([]))["out"]
    h.run(wf.sd([wf.ours(a, 0.9, mode="merged"), wf.ours(b, -0.6, mode="merged")]))
    model = entry_of(h, a).model_ref()
    original = weights(model)
    # the snapshot is the file's weights: the merged run before it left them untouched
    unet = {k.removeprefix("diffusion_model."): v for k, v in original.items()}
    assert all(torch.equal(unet[k], v.to(unet[k].dtype)) for k, v in h.unet_sd.items())
    for i in range(50):
        on = i % 2 == 0
        rows = [wf.ours(a, 0.9, enabled=on, mode="merged"), wf.ours(b, -0.6, enabled=on, mode="merged")]
        with count_weight_work(only=model) as work:
            out = h.run(wf.sd(rows, seed=42))["out"]
        assert dict(work) == {}, (i, dict(work))
        assert close(out, stock) if on else torch.equal(out, base), i
        if on:
            ev = h.last_event()
            assert ev["path"] == "full" and ev["reason"].startswith("mode merged") and "no reload" in ev["reason"], ev
        now = weights(model)
        assert all(torch.equal(now[k], original[k]) for k in original), i


def test_auto_measures_both_forms_then_keeps_the_faster(fresh, merge_loras):
    """auto: a warm-up sampling (dynamic), one measured sampling of each form, then the form
    with the lower measured time; outputs equal stock's in every form and no reload."""
    h = fresh
    a, _ = merge_loras
    stock = {seed: h.run(wf.sd([wf.stock(a, 1.1)], seed=seed))["out"] for seed in range(60, 66)}
    h.run(wf.sd([wf.ours(a, 1.1, enabled=False)], seed=59))
    h.lc.events.clear()
    for seed in range(60, 66):
        out = h.run(wf.sd([wf.ours(a, 1.1)], seed=seed))["out"]
        assert close(out, stock[seed]), seed
    samplings = h.lc.stats()["samplings"]
    assert [s["form"] for s in samplings[:3]] == ["dynamic", "dynamic", "merged"], samplings
    # Replaying the measurements: from the fourth sampling on, each choice is the form with the
    # lower measured time so far (moving average), as the stats route shows it.
    seen = {"dynamic": samplings[1]["ms"], "merged": samplings[2]["ms"]}
    for s in samplings[3:]:
        assert s["form"] == min(seen, key=seen.get) and "measured faster" in s["reason"], (s, seen)
        seen[s["form"]] = 0.7 * seen[s["form"]] + 0.3 * s["ms"]
    costs = h.lc.stats()["auto_costs"]
    assert len(costs) == 1 and costs[0]["dynamic_ms"] == pytest.approx(seen["dynamic"])
    model = entry_of(h, a).model_ref()
    assert not any(hasattr(m, "lora_cache_slot") and m.lora_cache_slot.installed for m in model.modules())
