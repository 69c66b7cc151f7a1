"""Memory and faults on the real server (HTTP + websocket only): a soak of 300+ queued runs
checked against stock with flat memory, POST /interrupt in the middle of sampling, and
ComfyUI's "Unload models" (POST /free) between runs, also under --disable-smart-memory.

The servers' base directories hold the test kit's CPU-as-device node (cpu_device.py): on this
CPU-only host the CPU is handled like a GPU, so an unload moves the factors and the next run
must move them back, the code path a GPU takes."""
from __future__ import annotations

import json
import random
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lora_cache_testkit import demo
from lora_cache_testkit.compare import close
from lora_cache_testkit.server import ComfyServer, make_base_dir

SOAK_RUNS = 320
WARMUP = 60

pytestmark = pytest.mark.server


def prompt(lora: str | None, strength: float = 1.0, enabled: bool = True, stock: bool = False,
           steps: int = 1, prefix: str = "soak", seed: int = 3) -> dict:
    """UNETLoader -> LoRA node (ours or the stock twin; none for the stock base) -> KSampler ->
    SaveLatent. A distinct prefix per run makes SaveLatent write even when nothing else changed."""
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "LotusConditioning", "inputs": {}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": steps, "cfg": 1.5, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
    if lora is None or (stock and not enabled):
        p["5"]["inputs"]["model"] = ["1", 0]
    elif stock:
        p["4"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": lora, "strength_model": strength}}
    else:
        p["4"] = {"class_type": "LoraCacheLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": lora, "strength_model": strength, "enabled": enabled, "mode": "auto"}}
    return p


def run_ok(server: ComfyServer, p: dict) -> dict:
    res = server.run(p)
    assert res["status"] == 200, res
    errors = [d for t, d in res["messages"] if t == "execution_error"]
    assert not errors, errors
    return res


def saved_latent(server: ComfyServer, res: dict) -> torch.Tensor:
    for t, d in res["messages"]:
        if t == "executed" and d.get("node") == "6":
            f = d["output"]["latents"][0]
            return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]
    raise AssertionError(f"no SaveLatent output in {[t for t, _ in res['messages']]}")


SETTINGS = [(lora, strength, True) for lora in ("style.safetensors", "detail.safetensors")
            for strength in (1.0, 0.5, -0.7)] + [("style.safetensors", 1.0, False), ("detail.safetensors", 0.5, False)]


def references(server: ComfyServer, steps: int = 1, seed: int = 3) -> dict:
    """Stock outputs, once per distinct setting: the stock twin, or the bare model when off."""
    refs, n = {}, 0
    for lora, strength, enabled in SETTINGS:
        key = (lora, strength) if enabled else None
        if key in refs:
            continue
        n += 1
        res = run_ok(server, prompt(lora, strength, enabled, stock=True, steps=steps, seed=seed, prefix=f"ref{n}"))
        refs[key] = saved_latent(server, res)
    return refs


@pytest.mark.slow
def test_soak_outputs_match_stock_and_memory_stays_flat(server):
    refs = references(server)
    assert len(refs) == 7
    proc = psutil.Process(server.proc.pid)
    rng = random.Random(6)
    rss, cached, paths = [], [], []
    for i in range(SOAK_RUNS):
        lora, strength, enabled = rng.choice(SETTINGS)
        res = run_ok(server, prompt(lora, strength, enabled, prefix=f"soak/{i}"))
        out = saved_latent(server, res)
        ref = refs[(lora, strength) if enabled else None]
        assert close(out, ref), (i, lora, strength, enabled, (out - ref).abs().max())
        ran = [d for t, d in res["messages"] if t == "lora_cache.event"]
        paths += [d["path"] for d in ran]
        if i >= WARMUP and i % 20 == 0:
            stats = server.get("/lora_cache/stats")
            rss.append(proc.memory_info().rss)
            cached.append((len(stats["adapters"]), dict(stats["bytes_by_device"])))
    # every setting ran many times; after the two first uses the node never rebuilt
    assert paths.count("build") == 2, paths[:20]
    assert set(paths) <= {"build", "fast", "off"} and paths.count("fast") > 100 and paths.count("off") > 30
    # cached adapters and their bytes: exactly constant after warm-up
    assert len(set(json.dumps(c, sort_keys=True) for c in cached)) == 1, cached
    assert cached[0][0] == 2
    # process memory: no growth trend after warm-up (allocator noise and ComfyUI's own
    # prompt history, a few KB per prompt, stay far below this)
    growth = max(rss) - rss[0]
    mb = [round(r / 2**20, 1) for r in rss]
    assert growth < 48 * 2**20, f"RSS after warm-up grew {growth / 2**20:.1f} MB: {mb}"
    late = sum(rss[len(rss) // 2:]) / len(rss[len(rss) // 2:]) - sum(rss[: len(rss) // 2]) / len(rss[: len(rss) // 2])
    assert late < 24 * 2**20, f"RSS trend {late / 2**20:.1f} MB between halves: {mb}"
    print(f"soak: {SOAK_RUNS} runs, RSS after warm-up (MB) {mb}, cached {cached[0]}")


def test_interrupt_mid_sampling_then_runs_match_stock(server):
    steps = 200
    ref = saved_latent(server, run_ok(server, prompt("style.safetensors", 0.8, stock=True, steps=2, seed=9,
                                                     prefix="iref")))
    status, body = server.queue(prompt("style.safetensors", 0.8, steps=steps, seed=9, prefix="int"))
    assert status == 200, body
    pid = body["prompt_id"]
    msgs, sent = [], False
    deadline = time.time() + 120
    while time.time() < deadline:
        msg = json.loads(server.ws.recv())
        data = msg.get("data", {})
        if data.get("prompt_id") not in (None, pid):
            continue
        msgs.append((msg["type"], data))
        if not sent and msg["type"] == "progress" and data.get("node") == "5" and data["value"] >= 1:
            assert server.request("POST", "/interrupt")[0] == 200
            sent = True
        if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == pid:
            break
    types = [t for t, _ in msgs]
    assert sent and "execution_interrupted" in types, types
    last = max(d["value"] for t, d in msgs if t == "progress" and d.get("node") == "5")
    assert last < steps  # it stopped in the middle
    hist = server.get(f"/history/{pid}")[pid]
    assert hist["status"]["status_str"] == "error"
    out = saved_latent(server, run_ok(server, prompt("style.safetensors", 0.8, steps=2, seed=9, prefix="after")))
    assert close(out, ref)
    base = saved_latent(server, run_ok(server, prompt(None, steps=2, seed=9, prefix="abase")))
    ours_off = saved_latent(server, run_ok(server, prompt("style.safetensors", 0.8, enabled=False, steps=2, seed=9,
                                                          prefix="aoff")))
    assert torch.equal(base, ours_off)


def adapter(server, name):
    return next(a for a in server.get("/lora_cache/stats")["adapters"] if a["name"] == name)


def last_event(server):
    return server.get("/lora_cache/stats")["events"][-1]


def test_unload_models_button_moves_factors_then_runs_match_stock(server):
    """POST /free {"unload_models": true} is the UI's "Unload models": ComfyUI unloads every
    model; the factors leave the device with it and come back before the next use."""
    ref = saved_latent(server, run_ok(server, prompt("detail.safetensors", 0.9, stock=True, steps=2, prefix="fref")))
    out = saved_latent(server, run_ok(server, prompt("detail.safetensors", 0.9, steps=2, prefix="f1")))
    assert close(out, ref)
    assert adapter(server, "detail.safetensors")["resident"]
    assert server.request("POST", "/free", {"unload_models": True})[0] == 200
    deadline = time.time() + 60
    while adapter(server, "detail.safetensors")["resident"]:
        assert time.time() < deadline, "the factors never left the device"
        time.sleep(0.2)
    stats = server.get("/lora_cache/stats")
    assert not any(a["resident"] for a in stats["adapters"])  # every cached adapter of the model left
    assert stats["memory"]["moved_to_cpu"]["bytes"] == sum(a["bytes"] for a in stats["adapters"]) > 0
    assert stats["memory"]["device"]["cpu"]["bytes"] == 0
    out = saved_latent(server, run_ok(server, prompt("detail.safetensors", 0.9, steps=2, prefix="f2")))
    ev = last_event(server)
    assert ev["path"] == "build" and "ComfyUI unloaded the model" in ev["reason"], ev
    assert close(out, ref)
    assert adapter(server, "detail.safetensors")["resident"]


@pytest.mark.slow
def test_disable_smart_memory_server_series_matches_stock(tmp_path):
    """--disable-smart-memory: ComfyUI unloads every model after each prompt, so the factors
    follow each time; every output still equals stock."""
    base = make_base_dir(tmp_path / "dsm", cpu_as_device=True)
    demo.make_files(base)
    with ComfyServer(base, ("--disable-smart-memory",)) as s:
        series = [("style.safetensors", 1.0, True), ("style.safetensors", 1.0, False),
                  ("style.safetensors", 1.0, True), ("style.safetensors", 0.6, True),
                  ("detail.safetensors", 1.0, True), ("style.safetensors", 0.6, True)]
        refs = {}
        paths = []
        for i, (lora, strength, enabled) in enumerate(series):
            key = (lora, strength) if enabled else None
            if key not in refs:
                refs[key] = saved_latent(s, run_ok(s, prompt(lora, strength, enabled, stock=True, prefix=f"r{i}")))
            res = run_ok(s, prompt(lora, strength, enabled, prefix=f"o{i}"))
            assert close(saved_latent(s, res), refs[key]), (i, lora, strength, enabled)
            paths += [(d["path"], d["reason"]) for t, d in res["messages"] if t == "lora_cache.event"]
            assert not any(a["resident"] for a in s.get("/lora_cache/stats")["adapters"])  # unloaded after the prompt
        assert [p for p, _ in paths] == ["build", "off", "build", "build", "build", "build"], paths
        assert all("ComfyUI unloaded the model" in r for p, r in paths[2:4] + paths[5:]), paths


def test_budget_follows_the_comfyui_setting(server):
    """The frontend stores the setting through ComfyUI's own settings API; the server-side budget
    reads it from there (and the settings extension is served to the browser)."""
    mb = lambda: server.get("/lora_cache/stats")["memory"]["device"]["cpu"]  # noqa: E731
    run_ok(server, prompt("style.safetensors", 0.5, prefix="s1"))
    assert "default" in mb()["source"]
    assert server.request("POST", "/settings/LoraCache.GpuBudgetMB", 640)[0] == 200
    try:
        assert mb()["limit"] == 640 * 2**20 and mb()["source"] == "ComfyUI setting LoraCache.GpuBudgetMB"
    finally:
        server.request("POST", "/settings/LoraCache.GpuBudgetMB", 0)
    assert "default" in mb()["source"]
    import urllib.request
    with urllib.request.urlopen(server.url + "/extensions/lora_cache_loader/lora_cache_settings.js", timeout=30) as r:
        assert b"LoraCache.GpuBudgetMB" in r.read()
