"""Merged copies (lora_cache/copies.py, copy_choice.py, cost_model.py, memory.py) on the CPU host.

A copy is ComfyUI's merge of a layer's active chain, built from the weight as ComfyUI casts it and
never written into it; samplings with the same chain reuse it, any other chain builds it again;
copies take only the memory the budget leaves them, the rest of the layers run unmerged with the
same outputs; the memory owner drops them when their adapter or their model goes."""
from __future__ import annotations

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.spies import count_weight_work

CPU = torch.device("cpu")
RANK = 4


@pytest.fixture(scope="module")
def lc(host):
    return host.lc


def flux_with_factors(lc, dtype, seed: int = 3):
    """A tiny Flux model in `dtype` and a rank-4 LoRA's factors for it, built as the node builds
    them (ComfyUI's key map and load_lora, then adapters.cached_forms): its fused qkv / linear1
    weights take diffusers q/k/v LoRAs as output slices."""
    cfg = comfy.supported_models.Flux(tiny_models.flux_config())
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "", device="cpu")
    tiny_models._randomize(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, CPU, mm.unet_offload_device())
    sd = tiny_models.flux_lora_state_dict(rank=RANK, seed=seed)
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model, {}))
    plan = lc.adapters.cached_forms(patches, patcher, "t.safetensors", CPU, dtype)
    assert plan.reason is None
    return patcher, patches, plan.layers


def stock_merge(lc, chain, key: str, weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI's merged weight for `key` from [(patches, strength), ...] (the patch path's
    calculate_weight in fp32), rounded to the weight's dtype as its loader does."""
    plist = []
    for patches, strength in chain:
        for target, adapter in patches.items():
            if lc.adapters.target_key(target) == key:
                offset = None if isinstance(target, str) else target[1]
                plist.append((strength, adapter, 1.0, offset, None))
    return comfy.lora.calculate_weight(plist, weight.to(torch.float32, copy=True), key).to(weight.dtype)


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in units of the dtype's rounding at the weight's scale."""
    eps = torch.finfo(want.dtype).eps
    return float((got.float() - want.float()).abs().max() / (eps * want.float().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_copy_is_comfyuis_merge_and_leaves_the_weights_untouched(lc, dtype):
    """One adapter (q/k/v slices of fused weights: one addmm per slice, one rounding) and two
    stacked (fp32 accumulation, one rounding): each copy equals ComfyUI's merge of the chain to
    within one rounding of the result, and the layers' weights are the same tensors with the
    same values afterwards."""
    patcher, patches, plan_a = flux_with_factors(lc, dtype, seed=3)
    _, patches_b, plan_b = flux_with_factors(lc, dtype, seed=4)
    model = patcher.model
    params = {p: model.get_submodule(p).weight for p in plan_a}
    values = {p: w.detach().clone() for p, w in params.items()}
    assert any(len(fs) > 1 for fs in plan_a.values()), "expected sliced (fused qkv) targets"
    for path, fs in plan_a.items():
        module = model.get_submodule(path)
        for chain, stock_chain in ((((fs, 0.8),), [(patches, 0.8)]),
                                   (((fs, 0.8), (plan_b[path], -0.5)), [(patches, 0.8), (patches_b, -0.5)])):
            key = lc.copies.CopyKey(tuple((i, s) for i, (_, s) in enumerate(chain)), ("base",))
            copy = lc.copies.build(module, chain, key, dtype, CPU)
            want = stock_merge(lc, stock_chain, path + ".weight", values[path])
            assert copy.weight.dtype == dtype and copy.weight.data_ptr() != module.weight.data_ptr()
            # In units of the dtype's rounding at the weight's scale: one rounding of the result,
            # plus per adapter either the rounding of its two factors to the model dtype (where
            # the cache holds them; ComfyUI reads the file's fp32 factors) or, in fp32, the sum
            # of its RANK products taken in another order than ComfyUI's.
            per_adapter = RANK if dtype == torch.float32 else 2
            assert ulps(copy.weight, want) <= 1 + per_adapter * len(chain), (path, len(chain))
            assert copy.bias is None or torch.equal(copy.bias, module.bias)
    for p, w in params.items():
        assert model.get_submodule(p).weight is w and torch.equal(w, values[p])


def test_choice_takes_required_then_most_saving_per_byte(lc):
    cm = lc.cost_model
    layers = [cm.LayerCost("big", 100, 5.0), cm.LayerCost("small", 10, 1.0), cm.LayerCost("mid", 50, 1.0),
              cm.LayerCost("asked", 60, 0.0, required=True)]
    assert cm.choose(layers, 1000) == ({"big", "small", "mid", "asked"}, 220)
    # 0.1/byte small, 0.05 big, 0.02 mid; "asked" first; "big" no longer fits, "mid" does
    assert cm.choose(layers, 130) == ({"asked", "small", "mid"}, 120)
    assert cm.choose(layers, 5) == (set(), 0)
    costs = cm.DeviceCosts(launch_s=1e-5, bytes_per_s=1e9)
    # the weight update's bound where the rows are not known; the cheaper update where they are
    # the weight update: W copied into a new tensor, then the covered rows read and written
    assert cm.unmerged_saving(64, 32, None, 1, 1, 64, 2, costs) == pytest.approx(4 * 64 * 32 * 2 / 1e9 + 1e-5)
    assert cm.unmerged_saving(64, 32, 64, 1, 1, 64, 2, costs) == pytest.approx(4 * 64 * 32 * 2 / 1e9 + 1e-5)
    assert cm.unmerged_saving(64, 32, 1, 1, 1, 64, 2, costs) == pytest.approx((32 + 2 * 64) * 2 / 1e9 + 2e-5)
    one_row = cm.unmerged_saving(4096, 4096, 1, 1, 1, 4096, 2, costs)  # a modulation layer: the output update
    assert one_row == pytest.approx((4096 + 2 * 4096) * 2 / 1e9 + 2e-5)
    measured = cm.device_costs("cpu")
    assert measured.launch_s > 0 and measured.bytes_per_s > 0 and cm.device_costs(CPU) is measured


@pytest.fixture(scope="module")
def copy_loras(host):
    return list(host.sd_loras({"cp_a": (61, ("attn", "ff", "conv")), "cp_b": (62, ("attn",))}).values())


def entry(h, lora):
    return next(e for e in h.lc.STORE.entries() if e.lora == lora and e.layers)


def model_of(h, lora):
    return entry(h, lora).model_ref()


def copy_objects(model) -> dict[str, object]:
    return {n: m.lora_cache_slot.copy for n, m in model.named_modules()
            if "lora_cache_slot" in m.__dict__ and m.lora_cache_slot.copy is not None}


def test_base_weights_are_read_from_the_file_in_spans(lc):
    """Base copies read their weights with one file read per span of adjacent tensors: a gap of
    norms or biases between two layers is read along, a far one or another file starts a new read,
    and no read passes the span size unless one tensor alone does."""
    from importlib import import_module

    base_read = import_module(lc.__name__ + ".base_read")
    mib = 1 << 20
    t = torch.empty(0)
    a, b = object(), object()

    def s(file, offset_mib, size_mib):
        return base_read._Slice(0, "weight", t, file, offset_mib * mib, size_mib * mib)

    # out of order, as layers come in module order and not in file order; 700 twice: a tied weight
    slices = [s(a, 10, 4), s(a, 0, 4), s(a, 4, 5), s(b, 0, 1), s(a, 15, 1),
              s(a, 100, 300), s(a, 400, 200), s(a, 600, 60),
              s(a, 700, 16), s(a, 700, 16), s(a, 717, 239), s(a, 957, 1)]
    spans = sorted([[(x.file_ref is a, x.offset // mib) for x in span] for span in base_read._spans(slices)],
                   key=lambda sp: (sp[0][0], sp[0][1]))
    assert spans == [[(False, 0)],  # another file
                     [(True, 0), (True, 4), (True, 10), (True, 15)],  # gaps of 1 MiB and under
                     [(True, 100)], [(True, 400)], [(True, 600)],  # 300 MiB alone; 200 + 60 > 256
                     [(True, 700), (True, 700), (True, 717)],  # a tied weight, read once; exactly 256 MiB
                     [(True, 957)]]  # 258 MiB with it


def test_copies_kept_across_runs_and_rebuilt_only_on_change(fresh, copy_loras):
    """auto on the CPU host (its memory holds every copy): the first sampling builds a copy per
    adapted layer; off keeps them; a re-enable runs the same copies (nothing built, the same
    tensors); a strength change builds them again from the base weights; a switch builds the
    other adapter's layers and leaves the first's other copies for the way back; ComfyUI does no
    weight work in any of it and every output equals stock's."""
    h = fresh
    a, b = copy_loras
    stock = {(n, s): h.run(wf.sd([wf.stock(n, s)]))["out"] for n, s in ((a, 0.9), (a, 0.5), (b, 0.9))}
    base = h.run(wf.sd([]))["out"]
    h.lc.events.clear()
    out = h.run(wf.sd([wf.ours(a, 0.9)]))["out"]
    model = model_of(h, a)
    first = copy_objects(model)
    s = h.lc.stats()["samplings"][-1]
    assert close(out, stock[(a, 0.9)]) and s["copies"] == s["layers"] == s["built"] == len(first) > 0, s
    assert s["reason"].startswith(f"merged copies: {len(first)} of {len(first)} layers"), s["reason"]
    assert "unmerged: 0" in s["reason"]
    for label, name, strength, on in (("off", a, 0.9, False), ("same", a, 0.9, True), ("strength", a, 0.5, True),
                                      ("switch", b, 0.9, True), ("back", a, 0.5, True)):
        before = copy_objects(model)
        with count_weight_work(only=model) as work:
            out = h.run(wf.sd([wf.ours(name, strength, enabled=on)]))["out"]
        assert dict(work) == {}, (label, dict(work))
        if not on:
            assert torch.equal(out, base) and copy_objects(model) == before, label
            continue
        assert close(out, stock[(name, strength)]), label
        s = h.lc.stats()["samplings"][-1]
        after = copy_objects(model)
        rebuilt = {n for n in after if after[n] is not before.get(n)}
        b_layers = set(entry(h, b).layers) if label in ("switch", "back") else set()
        want = {"same": set(), "strength": set(first), "switch": b_layers, "back": b_layers}[label]
        assert rebuilt == want and s["built"] == len(want), (label, s)
    mem = h.lc.stats()["memory"]["copies"]["cpu"]
    assert mem["layers"] == len(first) and mem["bytes"] == sum(c.nbytes for c in copy_objects(model).values())


@pytest.mark.slow
def test_weights_bit_identical_over_50_toggles_strengths_and_switches(fresh, copy_loras):
    """50 runs mixing toggles, strength changes and switches of two stacked adapters (LoCon
    convolutions included), auto and merged mode: every output equals stock's, every weight of
    the model after every run equals the file's bit for bit (the copies are new tensors), and
    ComfyUI never reloads or patches the model."""
    h = fresh
    a, b = copy_loras
    settings = [(0.9, -0.6), (0.4, -0.6), (0.9, 0.3)]
    stock = {st: h.run(wf.sd([wf.stock(a, st[0]), wf.stock(b, st[1])]))["out"] for st in settings}
    base = h.run(wf.sd([]))["out"]
    h.run(wf.sd([wf.ours(a, 0.9), wf.ours(b, -0.6)]))
    model = model_of(h, a)
    unet = {k.removeprefix("diffusion_model."): v for k, v in model.state_dict().items()}
    assert all(torch.equal(unet[k], v.to(unet[k].dtype)) for k, v in h.unet_sd.items())
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(50):
        on, st, mode = i % 3 != 1, settings[i % len(settings)], ("auto", "merged")[i % 2]
        rows = [wf.ours(a, st[0], enabled=on, mode=mode), wf.ours(b, st[1], enabled=on, mode=mode)]
        with count_weight_work(only=model) as work:
            out = h.run(wf.sd(rows, seed=42))["out"]
        assert dict(work) == {}, (i, dict(work))
        assert close(out, stock[st]) if on else torch.equal(out, base), i
        now = model.state_dict()
        assert all(torch.equal(now[k], original[k]) for k in original), i


def test_budget_gives_way_without_changing_outputs(fresh, copy_loras):
    """A copy budget below what every copy needs: the copies that save the most per byte are
    built, the other layers run unmerged, the event says how many and why, the output is the
    same; a lower budget drops copies at the next sampling; mode unmerged builds none and gives
    the layers' copies up."""
    h = fresh
    a, _ = copy_loras
    stock = {seed: h.run(wf.sd([wf.stock(a, 0.9)], seed=seed))["out"] for seed in (42, 43, 44, 45)}
    h.run(wf.sd([wf.ours(a, 0.9)]))
    model = model_of(h, a)
    everything = sum(c.nbytes for c in copy_objects(model).values())
    n_all = len(copy_objects(model))
    budget = h.lc.MEMORY.budget
    try:
        for seed, frac in ((43, 0.5), (44, 0.1)):  # another seed: ComfyUI samples again
            budget.copy_overrides["cpu"] = int(everything * frac)
            out = h.run(wf.sd([wf.ours(a, 0.9)], seed=seed))["out"]
            s = h.lc.stats()["samplings"][-1]
            kept = copy_objects(model)
            assert close(out, stock[seed]) and 0 < len(kept) < n_all, (frac, s)
            assert sum(c.nbytes for c in kept.values()) <= everything * frac
            assert s["copies"] == len(kept) and f"unmerged: {n_all - len(kept)}" in s["reason"]
            assert "capped at" in s["reason"], s["reason"]
            assert sum(1 for _, m, _ in entry(h, a).modules() if m.lora_cache_slot.copy is None) == n_all - len(kept)
        budget.copy_overrides.pop("cpu")
        out = h.run(wf.sd([wf.ours(a, 0.9, mode="unmerged")], seed=45))["out"]
        s = h.lc.stats()["samplings"][-1]
        assert close(out, stock[45]) and s["copies"] == 0 and s["reason"] == f"unmerged: {n_all} layers (mode unmerged)"
        assert not copy_objects(model) and h.lc.copies.REGISTRY.bytes("cpu") == 0
    finally:
        budget.copy_overrides.pop("cpu", None)


def test_out_of_memory_while_sampling_sheds_copies_and_samples_again(fresh, copy_loras, monkeypatch):
    """The device runs out of memory in a sampling: every merged copy there is dropped, later
    samplings hold at most half of what they held, and the sampling runs again to the same
    output."""
    import comfy.samplers
    h = fresh
    a, _ = copy_loras
    stock = h.run(wf.sd([wf.stock(a, 0.9)], seed=7))["out"]
    h.run(wf.sd([wf.ours(a, 0.9)]))
    model = model_of(h, a)
    held = sum(c.nbytes for c in copy_objects(model).values())
    real = comfy.samplers.CFGGuider.inner_sample
    raised = []

    def once(self, *args, **kwargs):
        if not raised:
            raised.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(comfy.samplers.CFGGuider, "inner_sample", once)
    try:
        out = h.run(wf.sd([wf.ours(a, 0.9)], seed=7))["out"]
        assert raised and close(out, stock)
        assert h.lc.MEMORY.copy_caps["cpu"] == held // 2
        assert 0 < sum(c.nbytes for c in copy_objects(model).values()) <= held // 2
    finally:
        h.lc.MEMORY.copy_caps.clear()


def test_copies_leave_with_their_adapter_and_their_model(fresh, copy_loras):
    """Purging the cache drops the copies of its adapters; ComfyUI unloading the model drops
    the copies of that model (at the next node execution's sweep)."""
    h = fresh
    a, _ = copy_loras
    h.run(wf.sd([wf.ours(a, 0.9)]))
    model = model_of(h, a)
    assert copy_objects(model) and h.lc.copies.REGISTRY.bytes("cpu") > 0
    h.lc.purge()
    assert not copy_objects(model) and h.lc.copies.REGISTRY.bytes("cpu") == 0
    h.run(wf.sd([wf.ours(a, 0.9)]))
    model = model_of(h, a)
    assert copy_objects(model)
    mm.unload_all_models()
    h.lc.MEMORY.sweep_unloaded()
    assert not copy_objects(model) and h.lc.copies.REGISTRY.bytes("cpu") == 0


def test_the_forward_multiplies_by_the_copy(fresh, copy_loras):
    """The layers run on their copies: a copy changed in place between two samplings of the same
    chain (which reuse it) changes the output, and the layer's own weight is never read."""
    h = fresh
    a, _ = copy_loras
    stock = h.run(wf.sd([wf.stock(a, 0.9)], seed=11))["out"]
    h.run(wf.sd([wf.ours(a, 0.9)]))
    model = model_of(h, a)
    path, copy = next(iter(copy_objects(model).items()))
    module = model.get_submodule(path)
    assert copy.bias is None or copy.bias.data_ptr() != module.bias.data_ptr()
    saved = copy.weight.clone()
    with torch.inference_mode():  # ComfyUI samples in inference mode: the copy is an inference tensor
        copy.weight.zero_()
    try:
        out = h.run(wf.sd([wf.ours(a, 0.9)], seed=11))["out"]
        assert h.lc.stats()["samplings"][-1]["built"] == 0 and copy_objects(model)[path] is copy
        assert not close(out, stock)
    finally:
        with torch.inference_mode():
            copy.weight.copy_(saved)
    assert close(h.run(wf.sd([wf.ours(a, 0.9)], seed=12))["out"], h.run(wf.sd([wf.stock(a, 0.9)], seed=12))["out"])


def test_layers_a_hook_lora_rewrites_run_unmerged(fresh, copy_loras):
    """A hook LoRA on the conditioning (CreateHookLoraModelOnly) makes ComfyUI rewrite the weights
    it targets in place while sampling, under the same patches_uuid: a copy built at the start
    would not see it. Those layers get no copy and run unmerged, and the output equals the stock
    loader with the same hook, in every mode; the event says why."""
    import nodes
    if "CreateHookLoraModelOnly" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no hook LoRA nodes")
    h = fresh
    a, b = copy_loras

    def hooked(rows):
        p = wf.sd(rows)
        p["hk"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": b, "strength_model": 1.0}}
        p["hc"] = {"class_type": "ConditioningSetProperties",
                   "inputs": {"cond_NEW": ["2", 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["hk", 0]}}
        p["5"]["inputs"]["positive"] = ["hc", 0]
        return p
    stock = h.run(hooked([wf.stock(a, 0.9)]))["out"]
    assert not close(stock, h.run(wf.sd([wf.stock(a, 0.9)]))["out"])  # the hook changes the output
    for mode in ("auto", "merged", "unmerged"):
        out = h.run(hooked([wf.ours(a, 0.9, mode=mode)]))["out"]
        assert close(out, stock), mode
        s = h.lc.stats()["samplings"][-1]
        if mode != "unmerged":
            assert 0 < s["copies"] < s["layers"] and "hook patches rewrite their weights" in s["reason"], s
