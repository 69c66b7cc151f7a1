"""The GPU benchmark's CPU smoke: benchmarks/bench_dynamic.py --tiny runs the whole script on the
classic patcher (the tiny SD-type model, stock, ComfyUI's bypass loader and our node in
interleaved rounds, the soak) and benchmarks/report_dynamic.py renders it. Asserts paths,
copies, weight streaming and exactness, never times."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _benchmark_module(name: str):
    """A script of benchmarks/ as a module (its functions, without running it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_tiny_run_and_report(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dynamic.py"), "--tiny", "--configs", "classic",
           "--rounds", "2", "--steps", "2", "--soak", "8", "--profile", "7", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the profiled event (the other LoRA's first use): the node call by function, the steps by op
    node = (out / "profile-ours-7-other-LoRA-node.txt").read_text()
    assert "lora_cache/service.py" in node and "load_lora" in node, node[:2000]
    steps = (out / "profile-ours-7-other-LoRA.txt").read_text()
    assert "== step 2" in steps and "-- streams: no device activity recorded" in steps  # no CUDA here
    results = out / "dynamic-sdxl.json"
    r = json.loads(results.read_text())
    import comfy.sd
    bypass = ["bypass"] if hasattr(comfy.sd, "load_bypass_lora_for_models") else []  # ComfyUI 0.3.75 has none
    assert r["comfyui"] and r["torch"] and r["loaders"] == ["stock", *bypass, "ours"]
    assert "allocator_asked" in r and r["allocator"] is None  # no CUDA here
    res = r["configs"]["classic"]
    assert len(res["rounds"]) == 2
    for rnd in res["rounds"]:
        ours = rnd["loaders"]["ours"]
        on = [e for e in ours if e.get("path")]
        assert [e["path"] for e in on] == ["build", "fast", "fast", "fast", "build", "fast"], on
        # every sampling with the adapter on runs a merged copy of every layer; the re-enables
        # run the copies the first event built, a strength change or switch builds them again
        assert all(e["copies"] == e["layers"] > 0 for e in on)
        assert [e["built"] > 0 for e in on] == [True, False, False, True, True, True]
        assert all(e["streamed_modules"] == 0 for e in ours)
    assert all(c["ok"] for c in r["checks"]), r["checks"]
    s = res["summary"]
    assert s["ceiling_s"] == pytest.approx(7 * s["base_image_s"])
    assert all(len(s[loader]["events_2_8_s"]) == 2 for loader in r["loaders"])

    report = ROOT / "benchmarks" / "report_dynamic.py"
    png = tmp_path / "chart.png"
    proc = subprocess.run([sys.executable, str(report), str(results), "--chart", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny SDXL, classic patcher" in proc.stdout and "ceiling (7 x base)" in proc.stdout
    assert png.stat().st_size > 1000
    assert proc.stdout.count("Max |latent - stock|: ours ") == 1 and "Checks: ok: " in proc.stdout

    # the same configuration twice more: a later run stopped at its time limit before its checks,
    # and a still later one of ours alone (a soak). The tables show all three; the chart the newest
    # beside stock; no run without stock claims a distance to it.
    first_round = {"classic": {k: v for k, v in res.items() if k != "summary"} | {"rounds": res["rounds"][:1]}}
    stopped = {**r, "configs": first_round, "checks": [], "started": "2099-01-01 00:00:00 UTC"}
    del stopped["finished"]
    alone = {**r, "loaders": ["ours"], "started": "2099-01-02 00:00:00 UTC"}
    (tmp_path / "stopped.json").write_text(json.dumps(stopped))
    (tmp_path / "alone.json").write_text(json.dumps(alone))
    proc = subprocess.run([sys.executable, str(report), str(results), str(tmp_path / "stopped.json"),
                           str(tmp_path / "alone.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("#### tiny SDXL, classic patcher") == 3
    assert proc.stdout.count("Checks: none, the run stopped at its time limit before them.") == 1
    assert proc.stdout.count("Max |latent - stock|: ours ") == 2
    groups = _benchmark_module("report_dynamic").chart_groups([r, alone, stopped])
    assert len(groups) == 1 and len(groups[0][1]["stock"]["events_2_8_s"]) == 1  # the stopped run's one round


def test_stream_summary_counts_the_compute_streams_idle_time_while_weights_copy():
    """A profiled step's streams: the compute stream is the one with the most work other than
    copies; of the host-to-device copies' time, the part where it did nothing is reported (the
    room that work queued before a layer's wait for its weight would fill without adding to the
    step)."""
    ms = 1_000_000
    spans = [(7, 0, 10 * ms, False), (7, 30 * ms, 40 * ms, False), (7, 8 * ms, 9 * ms, False),
             (9, 12 * ms, 13 * ms, False),  # a short kernel on another stream
             (13, 5 * ms, 20 * ms, True), (13, 20 * ms, 35 * ms, True)]  # weights copying in
    text = _benchmark_module("bench_dynamic").stream_summary(spans)
    assert text == ("-- streams: compute stream 7 busy 20.0 ms of 40.0 ms (idle 20.0 ms); host-to-device "
                    "copies 30.0 ms, 20.0 ms of them while the compute stream sat idle"), text


def test_a_gpu_boot_chooses_the_allocator_before_torch():
    """The benchmark and the GPU checks boot the host as ComfyUI's main.py starts: its
    `cuda_malloc` (which picks torch's CUDA allocator through PYTORCH_CUDA_ALLOC_CONF, read once
    when torch is imported) before torch; a boot after torch was imported is refused, since the
    script would measure another allocator than a ComfyUI server's."""
    first = ("import sys\nfrom lora_cache_testkit import host\nhost.boot(cpu=False)\n"
             "print('cuda_malloc' in sys.modules, 'torch' in sys.modules)\n")
    late = ("import torch\nfrom lora_cache_testkit import host\n"
            "try:\n    host.boot(cpu=False)\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    out = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
           for code in (first, late)]
    assert [p.returncode for p in out] == [0, 0], [p.stderr[-2000:] for p in out]
    assert out[0].stdout.split() == ["True", "False"], out[0].stdout
    assert "refused: torch is imported before ComfyUI chose its allocator" in out[1].stdout, out[1].stdout


def test_benchmark_tiny_sweep(tmp_path):
    """--sweep: the strengths as separate runs of stock and of ours, and as one sweep batch whose
    image i equals stock's run i (the noise of batch position i)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dynamic.py"), "--tiny", "--configs", "classic",
           "--rounds", "2", "--steps", "2", "--sweep", "0,0.5,-1", "--out", str(out)]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the generated model and LoRA files go with the process
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("lc_")]
    r = json.loads((out / "sweep-sdxl.json").read_text())
    res = r["configs"]["classic"]
    assert res["strengths"] == [0.0, 0.5, -1.0] and len(res["rounds"]) == 2
    for rnd in res["rounds"]:
        assert [x["strength"] for x in rnd["stock"]["runs"]] == [x["strength"] for x in rnd["ours"]["runs"]] \
            == [0.0, 0.5, -1.0]
        assert rnd["sweep"]["batch"] == 3 and "sweep of 3 images" in rnd["sweep"]["sampling"], rnd["sweep"]
    assert all(c["ok"] for c in r["checks"]), r["checks"]
    assert res["parity"]["max_abs_sweep_vs_stock"] <= 1e-3, res["parity"]
    assert set(res["summary"]) >= {"base_s", "base_batch_s", "stock_s", "ours_s", "sweep_s", "stock_over_sweep",
                                   "sweep_over_base_batch"}
