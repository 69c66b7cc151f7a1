"""The GPU benchmark's CPU smoke: benchmarks/bench.py --tiny runs the whole script (ComfyUI's
SDXL and Flux classes at tiny size, stock and our node, per-step modes, the forward forms and
the in-place merge) and benchmarks/report.py renders it. Asserts paths, counts and exactness,
never times."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cache_testkit import compare

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# fp32 on the CPU: the relative error within one worst-case rounding of the longest sum
# (compare.close's rule; the benchmark's tiny models sum over at most 2816 < K_MAX terms), and
# each form's adapter far above it.
REL_TOL = compare.relative_tolerance(torch.float32)


def test_benchmark_tiny_run_and_report(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--out", str(out), "--repeats", "1",
           "--stock-repeats", "sdxl=1,flux=1", "--steps", "2", "--image-rounds", "1", "--forms"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["tiny"] and r["comfyui"] and r["torch"]
    assert set(r["models"]) == {"sdxl", "flux"}

    for kind, m in r["models"].items():
        n = m["block_linears"]
        assert n > 0
        # stock: every toggle reloads and re-merges every targeted layer
        stock_ops = [row["op"] for row in m["stock"]]
        assert stock_ops == ["first apply", "off", "re-enable", "strength change", "switch"]
        for row in m["stock"]:
            assert row["weight_work"].get("load") == 1
            assert row["weight_work"].get("patch_weight", 0) == (0 if row["op"] == "off" else n)
        # ours: build once per adapter, then only flags; ComfyUI moves no weight
        paths = [(row["op"], row["path"]) for row in m["ours"]]
        assert paths == [("first apply", "build"), ("first apply (2nd adapter)", "build"), ("off", "off"),
                         ("re-enable", "fast"), ("strength change", "fast"), ("switch", "fast")]
        for row in m["ours"]:
            assert row["weight_work"] == {}, row
            assert row["finite"]
            if row["op"] == "off":
                assert row["bit_equal_stock"]
            else:
                assert row["rel_err_vs_stock"] <= REL_TOL, row
        assert len(m["cache"]["entries"]) == 2 and all(e["layers"] == n for e in m["cache"]["entries"])
        # per step: no wrapper in the call path when off; one per layer when on
        per = m["per_step"]
        assert per["base"]["wrappers_in_call_path"] == 0
        assert per["off"]["wrappers_in_call_path"] == 0 and per["off"]["same_patcher_as_base"]
        assert per["dynamic"]["wrappers_in_call_path"] == n and per["dynamic"]["path"] == "fast"
        assert per["merged"]["wrappers_in_call_path"] == 0
        assert per["merged (cache, in place)"]["wrappers_in_call_path"] == 0
        assert all(len(p["step_ms_all"]) >= 1 and p["finite"] for p in per.values())
        # forms: each is the merged model's function; the merge restores exactly
        f = m["forms"]
        assert f["restore_output_bit_equal"]
        assert f["layers"] == n
        for name, row in f["rows"].items():
            assert row["finite"]
            if not name.startswith("base") and name != "noop":
                assert row["rel_err_vs_merged"] <= REL_TOL < row["rel_err_base_vs_merged"], (kind, name, row)

    report = ROOT / "benchmarks" / "report.py"
    md, png = tmp_path / "RESULTS.md", tmp_path / "chart.png"
    proc = subprocess.run([sys.executable, str(report), str(out / "results.json"), "--md", str(md), "--png", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = md.read_text()
    assert "tiny SDXL" in text and "tiny Flux" in text and r["command"] in text
    assert png.stat().st_size > 1000
