"""Memory: the LRU policy, the byte budget (device tier -> CPU -> out of memory,
pinned adapters never evicted) and ComfyUI's own unloads (unload_all_models, free_memory,
--disable-smart-memory), on the real in-process host.

The host has no GPU, so the tests count the CPU as a device (the test kit's cpu_device.py
replaces memory.can_offload from the outside): the CPU is then handled like an accelerator
(factors 'moved to the CPU' are copied to new host tensors and flagged), which runs exactly the
code a GPU runs, and a budget is set for the 'cpu' device."""
from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.cpu_device import cpu_as_device


@pytest.fixture(scope="module")
def loras(host):
    return host.sd_loras({"m_a": (61, ("attn", "ff")), "m_b": (62, ("attn",)), "m_c": (63, ("attn", "ff"))})


@pytest.fixture
def mem(host):
    """CPU handled like a device, budgets reset afterwards."""
    host.new_executor()
    host.lc.purge()
    from lora_cache_loader.lora_cache import memory
    owner = host.lc.MEMORY
    owner.policy.counters.clear()
    with cpu_as_device(memory):
        yield host
    owner.budget.overrides.clear()
    owner.budget.host_override = None
    host.lc.purge()


def entry(h, lora):
    es = [e for e in h.lc.STORE.entries() if e.lora == lora]
    assert len(es) == 1, es
    return es[0]


def test_lru_policy(host):
    from lora_cache_loader.lora_cache import budget
    p = budget.LRUPolicy()
    for k in "abc":
        p.mark_used(k)
    assert p.select_victim("abc") == "a"
    p.mark_used("a")
    assert p.select_victim("abc") == "b"
    assert p.select_victim("abc", pinned={"b"}) == "c"
    assert p.select_victim("ab", pinned={"a", "b"}) is None
    p.remove("b")
    assert p.order() == ["c", "a"]
    assert p.select_victim({"x"}) == "x"  # never used counts as oldest


def test_budget_env_and_setting(host, monkeypatch, tmp_path):
    from lora_cache_loader.lora_cache import budget
    b = budget.Budget()
    limit, source = b.device_limit("cpu")
    assert limit > 0 and "default" in source
    import folder_paths
    user = tmp_path / "user"
    (user / "default").mkdir(parents=True)
    (user / "default" / "comfy.settings.json").write_text('{"LoraCache.GpuBudgetMB": 12}')
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(user))
    assert b.device_limit("cpu") == (12 * 2**20, "ComfyUI setting LoraCache.GpuBudgetMB")
    monkeypatch.setenv("LORA_CACHE_GPU_BUDGET_MB", "3")
    assert b.device_limit("cpu")[0] == 3 * 2**20  # the environment wins
    monkeypatch.setenv("LORA_CACHE_CPU_BUDGET_MB", "5")
    assert b.host_limit()[0] == 5 * 2**20


def test_budget_moves_lru_to_cpu_then_out_of_memory(mem, loras):
    h = mem
    owner = h.lc.MEMORY
    stock = {n: h.run(wf.sd([wf.stock(loras[n], 0.9)]))["out"] for n in ("m_a", "m_b", "m_c")}
    size = {}
    for n in ("m_a", "m_b", "m_c"):
        h.run(wf.sd([wf.ours(loras[n], 0.9)]))
        size[n] = entry(h, loras[n]).nbytes
    h.lc.purge()
    # the device holds the biggest one alone, never two; the CPU tier holds one (the biggest)
    owner.budget.overrides["cpu"] = max(size.values()) + 1
    owner.budget.host_override = max(size.values()) + 1
    assert sum(sorted(size.values())[:2]) > owner.budget.overrides["cpu"]

    out = h.run(wf.sd([wf.ours(loras["m_a"], 0.9)]))["out"]
    a = entry(h, loras["m_a"])
    assert a.resident and close(out, stock["m_a"])
    out = h.run(wf.sd([wf.ours(loras["m_b"], 0.9)]))["out"]
    b = entry(h, loras["m_b"])
    assert close(out, stock["m_b"])
    assert b.resident and not a.resident  # a was least recently used: moved to the CPU
    assert "memory budget" in a.offload_reason
    stats = h.lc.stats()
    assert stats["memory"]["device"]["cpu"]["bytes"] == size["m_b"]
    assert stats["memory"]["device"]["cpu"]["limit"] == owner.budget.overrides["cpu"]
    assert stats["memory"]["moved_to_cpu"]["bytes"] == size["m_a"]
    assert {x["name"]: x["resident"] for x in stats["adapters"]} == {loras["m_a"]: False, loras["m_b"]: True}

    # a again: moved back before use (a build with its reason), b leaves the device
    out = h.run(wf.sd([wf.ours(loras["m_a"], 0.9)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and "moved to cpu" in ev["reason"] and "moved back" in ev["reason"], ev
    assert entry(h, loras["m_a"]) is a and a.resident and not b.resident
    assert close(out, stock["m_a"])

    # c: a leaves the device; the CPU tier now holds a and b, over its budget: b (older) is dropped
    out = h.run(wf.sd([wf.ours(loras["m_c"], 0.9)]))["out"]
    assert close(out, stock["m_c"])
    assert [e.lora for e in h.lc.STORE.entries() if e.lora == loras["m_b"]] == []
    assert not b.live and not a.resident
    assert owner.policy.counters["dropped"] == 1 and owner.policy.counters["moved_to_cpu"] >= 3
    out = h.run(wf.sd([wf.ours(loras["m_b"], 0.9)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and ev["reason"].startswith("first use"), ev
    assert close(out, stock["m_b"])


def test_adapters_in_use_are_never_evicted(mem, loras):
    """Two adapters chained in one prompt, a device budget that fits one: while sampling, both
    are pinned and on the device (so the output is right); afterwards the budget applies."""
    h = mem
    owner = h.lc.MEMORY
    stock = h.run(wf.sd([wf.stock(loras["m_a"], 0.7), wf.stock(loras["m_b"], -0.5)]))["out"]
    owner.budget.overrides["cpu"] = 1  # nothing fits
    seen = []
    from lora_cache_loader.lora_cache import layers, scope
    prompt = wf.sd([wf.ours(loras["m_a"], 0.7), wf.ours(loras["m_b"], -0.5)])
    # Our own ON_PRE_RUN, wrapped to record what the sampling sees right after it ran.
    orig = scope._on_pre_run

    def pre_run(patcher):
        orig(patcher)
        items = scope.stack_of(patcher).items
        seen.append([(e.lora, e.resident, e in owner.pinned(),
                      all(layers.is_installed(m) for _, m, _ in e.modules())) for e in (i.entry for i in items)])

    scope._on_pre_run = pre_run
    try:
        out = h.run(prompt)["out"]
    finally:
        scope._on_pre_run = orig
    assert close(out, stock)
    assert seen and len(seen[0]) == 2 and all(res and pin and inst for _, res, pin, inst in seen[0]), seen
    assert not owner.pinned()  # released at cleanup
    # the next node run applies the budget again: everything not in use leaves the device
    h.run(wf.sd([wf.ours(loras["m_c"], 0.5)]))
    assert not entry(h, loras["m_a"]).resident and not entry(h, loras["m_b"]).resident


@pytest.mark.parametrize("how", ["unload_all_models", "free_memory", "disable_smart_memory"])
def test_comfyui_unload_moves_factors_off_the_device(mem, loras, how):
    h = mem
    lora = loras["m_a"]
    stock = h.run(wf.sd([wf.stock(lora, 0.8)]))["out"]
    old = mm.DISABLE_SMART_MEMORY
    mm.DISABLE_SMART_MEMORY = how == "disable_smart_memory"
    try:
        out = h.run(wf.sd([wf.ours(lora, 0.8)]))["out"]
        e = entry(h, lora)
        assert close(out, stock)
        if how == "unload_all_models":
            mm.unload_all_models()
        elif how == "free_memory":
            mm.free_memory(1e30, mm.get_torch_device())
        # with --disable-smart-memory ComfyUI unloaded the model at the end of the prompt
        assert not e.resident and e.offload_reason == "ComfyUI unloaded the model", (e.resident, e.offload_reason)
        stats = h.lc.stats()
        assert stats["memory"]["device"]["cpu"]["bytes"] == 0
        assert stats["memory"]["moved_to_cpu"]["bytes"] == e.nbytes
        # the same prompt again: the node runs (the move changed its fingerprint), moves the
        # factors back (a build with its reason) and the output equals stock
        out = h.run(wf.sd([wf.ours(lora, 0.8)]))["out"]
        ev = h.last_event()
        assert ev["path"] == "build" and "ComfyUI unloaded the model" in ev["reason"], ev
        assert close(out, stock) and entry(h, lora) is e
        if how != "disable_smart_memory":
            assert e.resident
            h.run(wf.sd([wf.ours(lora, 0.8, enabled=False)]))
            out = h.run(wf.sd([wf.ours(lora, 0.8)]))["out"]
            assert h.last_event()["path"] == "fast" and close(out, stock)
        else:
            assert not e.resident  # unloaded again after this prompt
    finally:
        mm.DISABLE_SMART_MEMORY = old


def test_cpu_homed_factors_stay_without_cpu_as_device(host, loras):
    """On a real --cpu install the factors already live in host memory: an unload moves nothing
    and the next re-enable stays fast (nothing to gain from copying host memory to itself)."""
    h = host
    h.new_executor()
    h.lc.purge()
    from lora_cache_loader.lora_cache import memory
    assert not memory.can_offload(torch.device("cpu"))
    h.run(wf.sd([wf.ours(loras["m_b"])]))
    mm.unload_all_models()
    assert entry(h, loras["m_b"]).resident
    h.run(wf.sd([wf.ours(loras["m_b"], 0.5)]))
    assert h.last_event()["path"] == "fast"
    h.lc.purge()


def test_unload_after_a_stock_load_still_moves_factors_off_the_device(mem, loras):
    """The model's last load was a stock LoRA clone (no callback of ours): ComfyUI's unload
    tells us nothing, yet the next node run finds the model gone and moves the factors off the
    device (and back for its own use); the stats route only reads. The run equals stock."""
    h = mem
    owner = h.lc.MEMORY
    lora = loras["m_b"]
    h.run(wf.sd([wf.ours(lora, 0.6)]))
    e = entry(h, lora)
    stock = h.run(wf.sd([wf.stock(lora, 0.6)]))["out"]  # stock loads the model last
    assert e.resident
    mm.unload_all_models()
    # GET /lora_cache/stats is a read: it moves nothing and changes no generation. (Our clone
    # of the first run may have been collected meanwhile, and its ON_DETACH swept already.)
    generation, resident = h.lc.STORE.generation, e.resident
    stats = h.lc.stats()
    assert (e.resident, h.lc.STORE.generation) == (resident, generation)
    assert stats["memory"]["device"]["cpu"]["bytes"] == (e.nbytes if resident else 0)
    out = h.run(wf.sd([wf.ours(lora, 0.6)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and "moved to cpu (ComfyUI unloaded the model)" in ev["reason"], ev
    assert owner.policy.counters["moved_to_cpu"] >= 1 and e.resident
    assert close(out, stock)


def _storages(entry) -> dict[int, int]:
    """data_ptr -> bytes of every distinct storage the entry's factors hold (views share one)."""
    seen: dict[int, int] = {}
    for fs in entry.layers.values():
        for f in fs:
            for t in (f.shared_down, f.down, f.up, f.mid):
                if t is not None:
                    s = t.untyped_storage()
                    seen[s.data_ptr()] = s.nbytes()
    return seen


def test_flux_fused_qkv_factors_leave_and_return_as_one(mem):
    """Flux's q/k/v (and single blocks' q/k/v/mlp) share one down projection per layer. An entry
    moved off the device by the budget leaves nothing behind there (every tensor the device held,
    the shared one included, is freed), and moved back it holds each byte once."""
    import gc
    import weakref

    h = mem
    owner = h.lc.MEMORY
    tiny_models.write_lora(h.loras / "m_flux.safetensors", tiny_models.flux_lora_state_dict(seed=64))
    tiny_models.write_lora(h.loras / "m_flux2.safetensors", tiny_models.flux_lora_state_dict(seed=65))
    stock = h.run(wf.sd([wf.stock("m_flux.safetensors", 0.8)], model="flux"))["out"]
    out = h.run(wf.sd([wf.ours("m_flux.safetensors", 0.8, mode="unmerged")], model="flux"))["out"]
    assert close(out, stock)
    e = entry(h, "m_flux.safetensors")
    shared = [fs for fs in e.layers.values() if len(fs) > 1]
    assert shared and all(f.shared_down is fs[0].shared_down is not None for fs in shared for f in fs)
    on_device = _storages(e)
    assert sum(on_device.values()) == e.nbytes  # each byte once
    held = [weakref.ref(t) for fs in e.layers.values() for f in fs
            for t in (f.shared_down, f.down, f.up) if t is not None]

    # a second adapter with a budget that fits one: e leaves the device
    owner.budget.overrides["cpu"] = e.nbytes + 1
    h.run(wf.sd([wf.ours("m_flux2.safetensors", 0.8, mode="unmerged")], model="flux"))
    assert not e.resident and "memory budget" in e.offload_reason
    gc.collect()
    assert all(r() is None for r in held), "a tensor of the moved entry is still alive on the device"
    assert sum(_storages(e).values()) == e.nbytes
    assert owner.stats()["moved_to_cpu"]["bytes"] == e.nbytes

    # back on the device once, each byte once, and the output equals stock again
    out = h.run(wf.sd([wf.ours("m_flux.safetensors", 0.8, mode="unmerged")], model="flux"))["out"]
    assert e.resident and h.last_event()["path"] == "build"
    assert close(out, stock)
    assert sum(_storages(e).values()) == e.nbytes
    assert all(f.down.untyped_storage().data_ptr() == fs[0].shared_down.untyped_storage().data_ptr()
               for fs in shared for f in fs)


class _FailOnce:
    """Test node: a clone whose sampling raises torch.OutOfMemoryError the first time, through
    ComfyUI's own OUTER_SAMPLE wrapper list (registered after ours, so it runs inside ours)."""

    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("MODEL",)
    calls = 0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "fail": ("BOOLEAN", {"default": True})}}

    def make(self, model, fail):
        from comfy.patcher_extension import WrappersMP

        def wrapper(executor, *args, **kwargs):
            type(self).calls += 1
            if fail and type(self).calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            return executor(*args, **kwargs)

        n = model.clone()
        n.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "lc_test_oom", wrapper)
        return (n,)


def _with_fail_once(prompt: dict, fail: bool = True) -> dict:
    prompt["oom"] = {"class_type": "LCTestFailOnce", "inputs": {"model": prompt["5"]["inputs"]["model"], "fail": fail}}
    prompt["5"]["inputs"]["model"] = ["oom", 0]
    return prompt


def test_out_of_memory_while_sampling_moves_unused_factors_first(mem, loras):
    """The device runs out of memory while our factors sit on it: factors that this sampling does
    not use leave the device, the sampling runs again and equals stock; with nothing of ours to
    free, the error is ComfyUI's and the next prompt runs. (Mode dynamic: no merged copies,
    which test_copies covers giving way first.)"""
    h = mem
    h.nodes.NODE_CLASS_MAPPINGS["LCTestFailOnce"] = _FailOnce
    try:
        stock = h.run(wf.sd([wf.stock(loras["m_a"], 0.7)]))["out"]
        h.run(wf.sd([wf.ours(loras["m_b"], 0.7, mode="unmerged")]))  # cached, not used by the next sampling
        b = entry(h, loras["m_b"])
        _FailOnce.calls = 0
        out = h.run(_with_fail_once(wf.sd([wf.ours(loras["m_a"], 0.7, mode="unmerged")])))["out"]
        assert _FailOnce.calls == 2 and close(out, stock)
        assert not b.resident and b.offload_reason == "the device ran out of memory while sampling"
        assert entry(h, loras["m_a"]).resident

        _FailOnce.calls = 0  # nothing of ours left to move: the sampling fails as it would without us
        err = h.run(_with_fail_once(wf.sd([wf.ours(loras["m_a"], 0.5, mode="unmerged")])), expect_error=True)
        assert "out of memory" in err["exception_message"] and _FailOnce.calls == 1
        out = h.run(wf.sd([wf.ours(loras["m_a"], 0.7, mode="unmerged")]))["out"]
        assert close(out, stock)
    finally:
        h.nodes.NODE_CLASS_MAPPINGS.pop("LCTestFailOnce", None)


def test_stats_read_while_the_map_drops_entries_never_deadlocks(mem, loras):
    """The stats route reads on the server's thread while a sampling thread stores and drops
    entries (a drop calls the memory owner back): both finish, neither waits on the other."""
    import threading

    h = mem
    h.run(wf.sd([wf.ours(loras["m_a"], 0.9)]))
    e = entry(h, loras["m_a"])
    store, owner = h.lc.STORE, h.lc.MEMORY
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            owner.stats()

    def writer():
        for _ in range(3000):
            store.put(e)
            store.drop(e)

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    threads[1].join(timeout=60)
    stop.set()
    threads[0].join(timeout=10)
    assert not any(t.is_alive() for t in threads), "stats() and the map's drop wait on each other"
    assert owner.stats()["pinned"] == 0 and e not in store.entries()


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
def test_dropped_model_is_freed_by_reference_counts(host, loras, mode):
    """A model that ComfyUI drops after samplings with ours (adapter on, off, on again) is freed by
    reference counts once our cache forgets its adapters: no adapted layer waits for the garbage
    collector (between samplings a layer holds no reference cycle of ours; ComfyUI warns of a
    leak and forces a full collection where a dropped model's modules stay alive)."""
    import gc
    import weakref

    import comfy.sample
    import comfy.sd

    lc = host.lc
    base = comfy.sd.load_diffusion_model(str(host.unets / "tiny_sd.safetensors"))
    g = torch.Generator().manual_seed(3)
    cond = [[torch.randn(1, 77, 1024, generator=g), {}]]
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 42)
    for enabled in (True, False, True):
        m = lc.apply(base, None, loras["m_a"], 0.8, 0.0, enabled, mode)[0]
        comfy.sample.sample(m, noise, 2, 1.5, "euler", "normal", cond, cond, latent, seed=42, disable_pbar=True)
    adapted = [weakref.ref(mod) for e in lc.STORE.entries() for _, mod, _ in e.modules()]
    model = weakref.ref(base.model)
    del m
    mm.unload_all_models()
    lc.purge()
    gc.collect()  # whatever was garbage before the drop
    assert adapted and model() is not None
    was = gc.isenabled()
    gc.disable()
    try:
        del base
        alive = sum(r() is not None for r in adapted)
        assert model() is None and alive == 0, (model() is None, alive, len(adapted))
    finally:
        if was:
            gc.enable()


def test_factors_live_in_one_allocation_from_the_build_on(mem, loras):
    """An entry's factors on a device are one allocation (lora_cache.arena), from its build on and
    after every move off the device and back, and the whole block is freed when they leave; in
    host memory they are a few pieces (arena.PIECE), here one for the tiny adapter. Outputs stay
    stock's."""
    from lora_cache_loader.lora_cache import low_rank
    h = mem
    owner = h.lc.MEMORY

    def storages(e) -> set:
        return {t.untyped_storage().data_ptr() for t in low_rank.tensors_of(e.layers.values())}

    stock = h.run(wf.sd([wf.stock(loras["m_a"], 0.9)]))["out"]
    out = h.run(wf.sd([wf.ours(loras["m_a"], 0.9)]))["out"]
    e = entry(h, loras["m_a"])
    assert len(e.layers) > 10 and len(storages(e)) == 1 and close(out, stock)
    first = storages(e)
    assert owner.offload(e, "test") and not e.resident
    assert len(storages(e)) == 1 and storages(e) != first
    out = h.run(wf.sd([wf.ours(loras["m_a"], 0.9)]))["out"]
    assert e.resident and len(storages(e)) == 1 and close(out, stock)
    assert owner.policy.counters["moved_to_cpu"] == 1 and owner.policy.counters["moved_back"] == 1


def _factor_storages(h) -> dict:
    """The memory of every cached factor tensor (a view's is its base's): cdata -> a weak
    reference to it (torch's StorageWeakRef: alive while any tensor or view holds the memory)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    out = {}
    for e in h.lc.STORE.entries():
        for _, _, forms in e.modules():
            for f in forms:
                for t in (getattr(f, "down", None), getattr(f, "up", None), getattr(f, "mid", None)):
                    if isinstance(t, torch.Tensor):
                        ref = StorageWeakRef(t.untyped_storage())
                        out[ref.cdata] = ref
    return out


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
def test_moved_factors_are_freed_by_reference_counts(mem, loras, mode, monkeypatch):
    """Factors that leave the device or come back are freed where they were by reference counts:
    between samplings nothing of ours holds a factor's old memory (device memory stays flat over
    switches, strength changes and toggles, with no garbage collection; a plan kept alive by a
    reference cycle holds views of the factors). ComfyUI's executor collects when a prompt's
    patcher died before its model; outside it (a script sampling with comfy.sample) nothing does,
    so the collector is off here, ComfyUI's call included."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)
    h = mem
    owner = h.lc.MEMORY
    size = {}
    for n in ("m_a", "m_b"):
        h.run(wf.sd([wf.ours(loras[n], 0.9)]))
        size[n] = entry(h, loras[n]).nbytes
    h.lc.purge()
    owner.budget.overrides["cpu"] = max(size.values()) + 1  # one adapter on the device at a time
    was = gc.isenabled()
    gc.disable()
    try:
        old: dict = {}
        for n, strength, on in (("m_a", 0.9, True), ("m_b", 0.9, True), ("m_a", 0.6, True), ("m_a", 0.6, False),
                                ("m_b", 0.9, True), ("m_a", 0.9, True), ("m_b", 0.9, False), ("m_b", 0.7, True)):
            old.update(_factor_storages(h))
            h.run(wf.sd([wf.ours(loras[n], strength, enabled=on, mode=mode)]))
            now = _factor_storages(h)
            held = [c for c, ref in old.items() if c not in now and not ref.expired()]
            assert not held, (n, strength, on, f"{len(held)} factor tensors' memory still held after they moved")
        assert owner.policy.counters["moved_to_cpu"] >= 3 and owner.policy.counters["moved_back"] >= 2
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
def test_samplings_leave_no_reference_cycles_of_ours(host, loras, mode):
    """After samplings with ours (adapter on, off, a strength change, another adapter; a text
    encoder's adapter on, off, on), nothing of ours is garbage that only the collector frees: a
    cycle made at a sampling's setup would keep its tensors (a weight plan's views of the factors,
    so the factors' device memory after they moved off) until a full collection, which may come
    many samplings later."""
    import gc

    h = host
    h.new_executor()
    te_lora = "te_cycles.safetensors"
    targets = {f"lora_te_text_model_encoder_layers_{layer}_self_attn_{p}": (64, 64)
               for layer in range(2) for p in ("q_proj", "v_proj")}
    tiny_models.write_lora(h.loras / te_lora, tiny_models.adapter_state_dict("lora", targets, seed=90))
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for n, strength, on in (("m_a", 0.9, True), ("m_a", 0.9, False), ("m_a", 0.6, True), ("m_b", 0.9, True)):
            h.run(wf.sd([wf.ours(loras[n], strength, enabled=on, mode=mode)]))
        for enabled in (True, False, True):  # the text encoder too, through the model-and-CLIP node
            h.run(wf.clip("LoraCacheLoader", {"lora_name": te_lora, "strength_model": 0.5, "strength_clip": 0.8,
                                              "enabled": enabled, "mode": mode}))
        assert h.last_event()["clip_path"] == "fast", h.last_event()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # classes aside: ComfyUI's node API clones the node class for each execution, and a class
        # is always in a cycle
        ours = [o for o in gc.garbage if not isinstance(o, type)
                and "lora_cache" in (getattr(o, "__module__", None) or type(o).__module__ or "")]
        names = sorted({getattr(o, "__qualname__", type(o).__qualname__) for o in ours})
        assert not ours, names
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()
        if was:
            gc.enable()
