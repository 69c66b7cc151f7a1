"""Parity with stock in every path, the fast path's guarantees, scope, file changes,
and bad input, on the real ComfyUI host (in-process) with tiny generated models."""
from __future__ import annotations

import math
import os

import comfy.model_management as mm
import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.spies import count_weight_work


@pytest.fixture(scope="module")
def loras(host):
    names = host.sd_loras({"a": (1, ("attn", "ff")), "b": (2, ("attn",)), "conv": (3, ("attn", "conv"))})
    return {**names, "flux": host.flux_lora("flux", 4)}


def paths(host, n):
    return [e["path"] for e in host.events()[-n:]]


def entry_for(host, lora):
    es = [e for e in host.lc.STORE.entries() if e.lora == lora and e.cache_problem is None]
    assert len(es) == 1
    return es[0]


@pytest.mark.parametrize("model", ["sd", "flux"])
def test_every_path_matches_stock(fresh, loras, model):
    """build, off, fast (auto, then merged mode: both run merged copies at sampling): each output
    equals the stock LoraLoader's, same seed."""
    h = fresh
    lora = loras["a"] if model == "sd" else loras["flux"]
    other = loras["b"] if model == "sd" else None
    base = h.run(wf.sd([], model=model))["out"]
    stock = h.run(wf.sd([wf.stock(lora, 0.8)], model=model))["out"]
    assert not close(base, stock)

    runs = [("build", dict(strength=0.8)), ("off", dict(strength=0.8, enabled=False)),
            ("fast", dict(strength=0.8)), ("fast", dict(strength=0.8, mode="merged")),
            ("fast", dict(strength=0.8, mode="unmerged"))]
    for expected, kw in runs:
        out = h.run(wf.sd([wf.ours(lora, **kw)], model=model))["out"]
        ev = h.last_event()
        assert ev["path"] == expected, ev
        assert close(out, base if expected == "off" else stock), (expected, (out - stock).abs().max())
        if expected == "off":
            assert torch.equal(out, base)
    # after stock merged its weights, the next dynamic run must not double-apply
    assert close(h.run(wf.sd([wf.stock(lora, 0.8)], model=model))["out"], stock)
    out = h.run(wf.sd([wf.ours(lora, 0.8)], model=model))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and "merged for another patcher" in ev["reason"], ev
    assert close(out, stock)
    if other:
        out = h.run(wf.sd([wf.ours(other)], model=model))["out"]
        assert close(out, h.run(wf.sd([wf.stock(other)], model=model))["out"])


def test_flux_fused_qkv_slices_are_dynamic(fresh, loras):
    h = fresh
    h.run(wf.sd([wf.ours(loras["flux"])], model="flux"))
    e = entry_for(h, loras["flux"])
    qkv = e.layers["diffusion_model.double_blocks.0.img_attn.qkv"]
    assert sorted(f.out_slice for f in qkv) == [(0, 64), (64, 64), (128, 64)]
    linear1 = e.layers["diffusion_model.single_blocks.0.linear1"]
    assert sorted(f.out_slice for f in linear1) == [(0, 64), (64, 64), (128, 64), (192, 256)]


def test_conv_locon_matches_stock(fresh, loras):
    h = fresh
    out = h.run(wf.sd([wf.ours(loras["conv"], 1.3)]))["out"]
    assert h.last_event()["path"] == "build"
    assert any(f.kind == "conv" for fs in entry_for(h, loras["conv"]).layers.values() for f in fs)
    assert close(out, h.run(wf.sd([wf.stock(loras["conv"], 1.3)]))["out"])


def test_clip_and_model_match_stock(fresh, loras, host):
    """LoraCacheLoader with model and CLIP: the sampled latent and the text conditioning equal
    the stock LoraLoader's; the text encoder takes the cached path too."""
    h = fresh
    sd_clip = dict(tiny_models.sd_lora_state_dict(h.unet_sd, seed=5))
    g = torch.Generator().manual_seed(9)
    for layer in range(2):
        for proj in ("q_proj", "v_proj", "out_proj"):
            k = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            sd_clip[k + ".lora_up.weight"] = 0.2 * torch.randn(64, 4, generator=g)
            sd_clip[k + ".lora_down.weight"] = 0.2 * torch.randn(4, 64, generator=g)
    tiny_models.write_lora(h.loras / "withclip.safetensors", sd_clip)
    stock = h.run(wf.clip("LoraLoader", {"lora_name": "withclip.safetensors", "strength_model": 0.9,
                                         "strength_clip": 0.7}))
    base = h.run(wf.clip("LoraCacheLoader", {"lora_name": "withclip.safetensors", "strength_model": 0.9,
                                             "strength_clip": 0.7, "enabled": False, "mode": "auto"}))
    assert not close(base["cond"][0], stock["cond"][0])
    for enabled, expected in ((True, "build"), (False, "off"), (True, "fast"), (False, "off"), (True, "fast")):
        got = h.run(wf.clip("LoraCacheLoader", {"lora_name": "withclip.safetensors", "strength_model": 0.9,
                                                "strength_clip": 0.7, "enabled": enabled, "mode": "auto"}))
        ev = h.last_event()
        assert ev["path"] == expected, ev
        ref = stock if enabled else base
        assert close(got["out"], ref["out"]) and close(got["cond"][0], ref["cond"][0])
        if enabled:
            assert ev["clip_path"] == expected, ev


@pytest.mark.parametrize("smart_memory", [True, False])
def test_toggle_history_fast_path_moves_no_weights(fresh, loras, smart_memory):
    """on -> off -> on -> off -> on: every re-enable is fast, reuses the same factor tensors,
    keeps patches_uuid, and makes ComfyUI do no weight work beyond what an off run does."""
    h = fresh
    old = mm.DISABLE_SMART_MEMORY
    mm.DISABLE_SMART_MEMORY = not smart_memory
    try:
        stock = h.run(wf.sd([wf.stock(loras["a"])]))["out"]
        h.run(wf.sd([]))  # base weights back in place
        out = h.run(wf.sd([wf.ours(loras["a"])]))["out"]
        assert h.last_event()["path"] == "build" and close(out, stock)
        entry = entry_for(h, loras["a"])
        tensors = {p: [id(f.down) for f in fs] for p, fs in entry.layers.items()}
        base_model = entry.model_ref()
        uuid0 = base_model.current_weight_patches_uuid

        work = []
        for enabled in [False, True, False, True, False, True]:
            with count_weight_work() as counts:
                out = h.run(wf.sd([wf.ours(loras["a"], enabled=enabled)]))["out"]
            ev = h.last_event()
            assert ev["path"] == ("fast" if enabled else "off"), ev
            assert close(out, stock) if enabled else not close(out, stock)
            work.append((enabled, dict(counts)))
            assert entry_for(h, loras["a"]) is entry
            assert {p: [id(f.down) for f in fs] for p, fs in entry.layers.items()} == tensors
            assert base_model.current_weight_patches_uuid in (uuid0, None)
            assert counts.get("patch_weight", 0) == 0 and counts.get("partially_unload", 0) == 0
        on = [c for e, c in work if e]
        off = [c for e, c in work if not e]
        if smart_memory:
            assert all(c == {} for c in on), on  # nothing loaded, restored or moved
        else:
            # ComfyUI unloads every model after each prompt; a re-enable costs what an off run costs.
            assert all(c == off[0] for c in on + off), work
    finally:
        mm.DISABLE_SMART_MEMORY = old


def test_fast_path_flags_only_while_sampling(fresh, loras, monkeypatch):
    """Layers carry a wrapper and the adapter's chain only during the sampling of a patcher that
    carries the adapter: there each targeted layer's slot runs exactly the cached factors."""
    from lora_cache_loader.lora_cache import layers
    h = fresh
    during = {}
    real = layers.activate

    def activate(module, chain, *args):
        real(module, chain, *args)
        slot = layers.slot_of(module)
        during[id(module)] = (slot.active, layers.is_installed(module))
    monkeypatch.setattr(layers, "activate", activate)
    h.run(wf.sd([wf.ours(loras["a"], 0.7)]))
    entry = entry_for(h, loras["a"])
    assert {id(m) for _, m, _ in entry.modules()} == set(during)
    for _, m, f in entry.modules():
        active, installed = during[id(m)]
        assert installed and len(active) == 1 and active[0][0] is f and active[0][1] == 0.7
        slot = layers.slot_of(m)
        assert not layers.is_installed(m) and "forward" not in m.__dict__
        assert slot.active == () and slot.chain == ()


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
def test_activations_run_no_garbage_collection(fresh, loras, monkeypatch, mode):
    """No garbage collection runs while an activation sets up (a re-enable, a strength change, a
    switch back), even with the collector's thresholds at their lowest: the objects it makes and
    drops are freed by their reference counts, never moved to the generation that only a full
    collection of the process frees. Outputs match stock throughout."""
    import gc

    from lora_cache_loader.lora_cache import scope
    h = fresh
    stock = {s: h.run(wf.sd([wf.stock(loras["a"], s)]))["out"] for s in (1.0, 0.6)}
    inside, collected, activations = [False], [], []

    def on_gc(phase, info):
        if phase == "start" and inside[0]:
            collected.append(info["generation"])
    real_set_up = scope._set_up

    def set_up(patcher, sampling):
        inside[0] = True
        activations.append(sampling)
        try:
            real_set_up(patcher, sampling)
        finally:
            inside[0] = False
    monkeypatch.setattr(scope, "_set_up", set_up)
    thresholds = gc.get_threshold()
    gc.callbacks.append(on_gc)
    gc.set_threshold(1, 1, 1)
    try:
        for strength, enabled in ((1.0, True), (1.0, False), (1.0, True), (0.6, True), (1.0, True)):
            out = h.run(wf.sd([wf.ours(loras["a"], strength, enabled=enabled, mode=mode)]))["out"]
            assert close(out, stock[strength]) if enabled else not close(out, stock[1.0])
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(on_gc)
    assert activations.count(True) == 4, activations
    assert collected == [], collected


@pytest.mark.parametrize("mode, per_layer", [("auto", 16), ("unmerged", 32)])
def test_an_activation_makes_few_tracked_objects_per_layer(fresh, loras, monkeypatch, mode, per_layer):
    """A re-enable's setup makes few objects the garbage collector tracks per adapted layer (the
    forwards are slotted objects installed as bound methods, not closures with a cell per value):
    what a sampling keeps survives into the collector's oldest generation and counts towards its
    next full collection of the process, even once reference counts free it. The bounds hold with
    headroom: a re-enable makes about 12 per layer in auto (merged copies) and 27 unmerged, where
    closures made 26 and 51."""
    import gc

    from lora_cache_loader.lora_cache import scope
    h = fresh
    made: list[int] = []
    real_set_up = scope._set_up

    def set_up(patcher, sampling):
        gc.collect()
        before = {id(o) for o in gc.get_objects()}
        real_set_up(patcher, sampling)
        made.append(sum(1 for o in gc.get_objects() if id(o) not in before))
    monkeypatch.setattr(scope, "_set_up", set_up)
    for enabled in (True, False, True):
        h.run(wf.sd([wf.ours(loras["a"], 1.0, enabled=enabled, mode=mode)]))
    ev = h.last_event()
    assert ev["path"] == "fast", ev
    layers = len(next(e for e in h.lc.STORE.entries() if e.lora == loras["a"]).layers)
    assert len(made) == 2 and made[-1] <= per_layer * layers, (made, layers)


def test_forward_after_comfy_bypass_loader_is_the_direct_one(fresh, loras, monkeypatch):
    """ComfyUI's bypass loader leaves each layer it injected into with its own class forward
    bound on the instance once it ejects; ours takes that for no forward of another party's:
    the sampling serves its layers with the weight update (tiny SD: every adapted Linear's weight
    is smaller than its activations) and matches stock, before and after the bypass loader."""
    import nodes

    from lora_cache_loader.lora_cache import layers, weight_update

    h = fresh
    if "LoraLoaderBypassModelOnly" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no bypass loader (0.3.75)")
    lora = loras["a"]
    served = []
    real = weight_update.merged_weight
    monkeypatch.setattr(weight_update, "merged_weight", lambda w, wp: served.append(w.shape) or real(w, wp))

    def prompt(loader):  # 256x256: more rows of activations than the tiny layers' weights have
        p = wf.sd([loader])
        p["3"]["inputs"].update(width=256, height=256)
        return p
    stock = h.run(prompt(wf.stock(lora, 0.8)))["out"]
    counts = []
    for before in (None, "LoraLoaderBypassModelOnly"):
        if before is not None:
            bypass = h.run(prompt((before, {"lora_name": lora, "strength_model": 0.8})))["out"]
            assert close(bypass, stock)
        served.clear()
        out = h.run(prompt(wf.ours(lora, 0.8, mode="unmerged")))["out"]  # unmerged: the forward under test
        assert h.last_event()["path"] in ("build", "fast")
        assert close(out, stock), (out - stock).abs().max()
        counts.append(len(served))
    entry = entry_for(h, lora)
    linear = [m for _, m, _ in entry.modules() if isinstance(m, torch.nn.Linear)]
    left = [m for m in linear if "forward" in m.__dict__]
    assert left and all(layers.own_forward(m, m.__dict__["forward"]) for m in left)  # the bypass loader's leftover
    assert counts[0] > 0 and counts[1] == counts[0], counts


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fast_reenable_node_call_does_no_per_layer_work(fresh, loras, kind):
    """The node call of a re-enable or strength change does entry-level work only: no layer's
    factors or derived states are read (but the first layer's, for the device the reason names),
    so its cost does not grow with the number of layers (700 on SDXL)."""
    import comfy.sd

    from lora_cache_loader.lora_cache import forms, low_rank

    h = fresh
    lora = loras["a"]
    if kind == "dora":
        lora = "a_dora.safetensors"
        tiny_models.write_lora(h.loras / lora, tiny_models.adapter_state_dict(
            "lora", tiny_models.sd_targets(h.unet_sd), seed=9, dora="out"))
    base = comfy.sd.load_diffusion_model(str(h.unets / "tiny_sd.safetensors"))
    lc = h.lc
    assert lc.apply(base, None, lora, 1.0, 0.0, True, "auto", node_id="n")[2].path == "build"
    reads = []
    spied = [(cls, "tensors", cls.tensors) for cls in (low_rank.LayerFactors, forms.Form)]
    spied.append((forms._States, "nbytes", forms._States.nbytes))
    for cls, name, orig in spied:
        if isinstance(orig, property):
            setattr(cls, name, property(lambda self, _orig=orig: reads.append(self) or _orig.fget(self)))
        else:
            setattr(cls, name, lambda self, _orig=orig: reads.append(self) or _orig(self))
    try:
        for enabled, strength in ((False, 1.0), (True, 1.0), (True, 0.6), (False, 0.6), (True, 0.6)):
            ev = lc.apply(base, None, lora, strength, 0.0, enabled, "auto", node_id="n")[2]
            assert ev.path == ("fast" if enabled else "off"), ev
    finally:
        for cls, name, orig in spied:
            setattr(cls, name, orig)
    assert len(reads) <= 5, reads  # five calls, at most one form each
    entry = entry_for(h, lora)
    assert entry.nbytes == sum(t.numel() * t.element_size() for fs in entry.layers.values()
                               for f in fs for t in f.tensors())


def test_partial_load_takes_full_path(fresh, loras):
    h = fresh
    stock = h.run(wf.sd([wf.stock(loras["a"])]))["out"]
    h.run(wf.sd([wf.ours(loras["a"])]))  # model fully loaded
    loaded = [lm for lm in mm.current_loaded_models if lm.model is not None]
    patcher = next(lm.model for lm in loaded if type(lm.model.model).__name__ == "BaseModel")
    patcher.partially_unload(patcher.offload_device, patcher.model_size() // 2)
    assert patcher.model.model_lowvram
    out = h.run(wf.sd([wf.ours(loras["a"], enabled=True, strength=1.0, mode="unmerged")]))["out"]
    ev = h.last_event()
    assert ev["path"] == "full" and "partially loaded" in ev["reason"], ev
    assert close(out, stock)


def test_two_adapters_chained_match_stock(fresh, loras):
    h = fresh
    stock = h.run(wf.sd([wf.stock(loras["a"], 0.7), wf.stock(loras["b"], -0.5)]))["out"]
    out = h.run(wf.sd([wf.ours(loras["a"], 0.7), wf.ours(loras["b"], -0.5)]))["out"]
    assert close(out, stock)
    mixed = h.run(wf.sd([wf.stock(loras["a"], 0.7), wf.ours(loras["b"], -0.5)]))["out"]
    assert close(mixed, stock)
    mixed = h.run(wf.sd([wf.ours(loras["a"], 0.7, mode="merged"), wf.ours(loras["b"], -0.5)]))["out"]
    assert close(mixed, stock)


def test_file_replaced_by_another_with_the_same_stat_rebuilds(fresh, loras):
    """Another file renamed over the LoRA, with its size and times made equal: only the inode
    tells, and the node builds from the new content."""
    h = fresh
    name = "replaced.safetensors"
    path = h.loras / name
    tiny_models.write_lora(path, tiny_models.sd_lora_state_dict(h.unet_sd, seed=23))
    h.run(wf.sd([wf.ours(name)]))
    st = os.stat(path)
    other = h.loras / "replacement.tmp"
    tiny_models.write_lora(other, tiny_models.sd_lora_state_dict(h.unet_sd, seed=24))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_ino != st.st_ino
    out = h.run(wf.sd([wf.ours(name)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and "file changed on disk (replaced by another file)" in ev["reason"], ev
    assert close(out, h.run(wf.sd([wf.stock(name)]))["out"])


def test_file_rewritten_same_name_rebuilds(fresh, loras):
    h = fresh
    name = "rewrite.safetensors"
    path = h.loras / name
    tiny_models.write_lora(path, tiny_models.sd_lora_state_dict(h.unet_sd, seed=21))
    h.run(wf.sd([wf.ours(name)]))
    old_entry = entry_for(h, name)
    st = os.stat(path)
    # Rewritten in place (the same inode), its size the same and its mtime restored: only the
    # content and the ctime differ.
    new = tiny_models.write_lora(h.loras / "rewrite.new", tiny_models.sd_lora_state_dict(h.unet_sd, seed=22))
    path.write_bytes(new.read_bytes())
    new.unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_ino == st.st_ino
    out = h.run(wf.sd([wf.ours(name)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and "file changed on disk (rewritten at " in ev["reason"], ev
    assert not old_entry.live and entry_for(h, name) is not old_entry
    assert close(out, h.run(wf.sd([wf.stock(name)]))["out"])
    # and back on again: fast, on the new file
    h.run(wf.sd([wf.ours(name, enabled=False)]))
    out = h.run(wf.sd([wf.ours(name)]))["out"]
    assert h.last_event()["path"] == "fast"
    assert close(out, h.run(wf.sd([wf.stock(name)]))["out"])


def test_branch_without_adapter_sees_exact_base(fresh, loras):
    """A second KSampler on the same base model, in the same prompt as the adapter and in later
    prompts, samples exactly the base model. Each seed is new, so ComfyUI samples it afresh."""
    h = fresh
    seeds = [100, 101, 102, 103]
    ref = {s: h.run(wf.sd([], seed=s))["out"] for s in seeds}
    h.new_executor()
    for s, strength in zip(seeds[:3], (1.0, 0.5, 1.0), strict=True):
        got = h.run(wf.sd([wf.ours(loras["a"], strength)], seed=s, base_branch=True))
        assert torch.equal(got["base"], ref[s])
        assert not close(got["out"], ref[s])
    assert [e["path"] for e in h.events()[-3:]] == ["build", "fast", "fast"]
    assert torch.equal(h.run(wf.sd([], seed=seeds[3]))["out"], ref[seeds[3]])


def _error_text(h, prompt, outputs=None):
    err = h.run(prompt, expect_error=True, outputs=outputs)
    assert err.get("node_type") in (wf.OURS, "LoraCacheLoader"), err
    return err["exception_message"]


def test_bad_inputs_name_file_and_cache_nothing(fresh, loras):
    h = fresh
    good = wf.sd([wf.ours(loras["a"])])
    cases = {}
    # missing: listed when the prompt is validated, gone when the node runs
    gone = h.loras / "gone.safetensors"
    tiny_models.write_lora(gone, tiny_models.sd_lora_state_dict(h.unet_sd, seed=3))
    cases["gone.safetensors"] = ("not found in the loras folders", lambda: gone.unlink())
    full = (h.loras / loras["a"]).read_bytes()
    (h.loras / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    cases["truncated.safetensors"] = ("could not be loaded", None)
    (h.loras / "notes.safetensors").write_text("this is not a safetensors file\n")
    cases["notes.safetensors"] = ("could not be loaded", None)
    tiny_models.write_lora(h.loras / "other.safetensors", {"transformer.foo.lora_A.weight": torch.ones(2, 3)})
    cases["other.safetensors"] = ("has no LoRA keys", None)
    for name, (text, before) in cases.items():
        prompt = wf.sd([wf.ours(name)])
        outputs = h.validate(prompt)
        if before:
            before()
        msg = _error_text(h, prompt, outputs)
        assert name in msg and text in msg, msg
        assert not [e for e in h.lc.STORE.entries() if e.lora == name]
        h.run(good)  # the next good run works
    msg = _error_text(h, wf.sd([wf.ours(loras["a"], strength=math.nan)]))
    assert loras["a"] in msg and "finite" in msg
    with pytest.raises(h.lc.LoraCacheError, match="finite"):
        h.lc.apply(None, None, loras["a"], math.inf, 0.0)
    with pytest.raises(h.lc.LoraCacheError, match="factors make"):
        bad = tiny_models.sd_lora_state_dict(h.unet_sd, seed=3)
        k = next(k for k in bad if k.endswith("lora_down.weight"))
        bad[k] = torch.ones(bad[k].shape[0], bad[k].shape[1] + 1)
        tiny_models.write_lora(h.loras / "shape.safetensors", bad)
        import nodes
        model = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet("tiny_sd.safetensors", "default")[0]
        h.lc.apply(model, None, "shape.safetensors", 1.0, 0.0)
    assert not [e for e in h.lc.STORE.entries() if e.lora == "shape.safetensors"]


def _weight_diffs(unet_sd) -> dict:
    """A file of ComfyUI "diff" patches (whole-weight differences, not a weight adapter)."""
    g = torch.Generator().manual_seed(31)
    keys = [k for k, w in unet_sd.items() if k.endswith(".weight") and w.ndim == 2 and ".attn1." in k][:4]
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_") + ".diff":
            0.02 * torch.randn(unet_sd[k].shape, generator=g)
            for k in keys}


def test_patches_that_are_not_weight_adapters_take_full_path_and_match_stock(fresh):
    """Every comfy.weight_adapter type has a cached form (tests/test_adapter_types.py); ComfyUI's
    plain "diff" patches go through its patch path, with the reason."""
    h = fresh
    name = "diff.safetensors"
    tiny_models.write_lora(h.loras / name, _weight_diffs(h.unet_sd))
    stock = h.run(wf.sd([wf.stock(name, 0.9)]))["out"]
    for enabled in (True, False, True):
        out = h.run(wf.sd([wf.ours(name, 0.9, enabled=enabled)]))["out"]
        ev = h.last_event()
        if enabled:
            assert ev["path"] == "full", ev
            assert "diff on 4 layers" in ev["reason"] and "no cached form" in ev["reason"], ev
            assert close(out, stock)
        else:
            assert ev["path"] == "off"
    entries = [e for e in h.lc.STORE.entries() if e.lora == name]
    assert len(entries) == 1 and entries[0].layers == {} and entries[0].nbytes == 0
