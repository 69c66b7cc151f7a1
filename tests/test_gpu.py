"""The GPU checks, on a machine with a CUDA GPU (`pytest -m gpu`): scripts/gpu_smoke.py,
scripts/gpu_memory_check.py, scripts/gpu_arena_check.py, scripts/gpu_graph_check.py and the
dynamic-VRAM checks run as they are (their own process, ComfyUI booted for the GPU as its main.py
boots), and their JSON reports are checked: the paths the node took, no weight work by ComfyUI,
outputs equal to stock within fp16 rounding, ComfyUI's patch path under --lowvram / --novram,
factors moved with their copies queued behind a held stream, blocks with our forward equal
captured in a CUDA graph and eager. Skipped without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_cache_testkit import compare, host

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The tiny model samples in fp16 on the GPU, summing in fp32: stock rounds its merged weights to
# fp16, the cached path rounds its low-rank product and the sum with the output to fp16. The
# tolerance of compare.close with those roundings (at most 7 of eps / 2 per layer between the two,
# as tests/test_forms.py counts them for the half-precision forms); measured: about 1e-4 of the
# output's range.
REL_TOL = compare.relative_tolerance(torch.float16, accumulate=torch.float32, roundings=4)


def report(script: str) -> dict:
    proc = subprocess.run([sys.executable, str(host.ROOT / "scripts" / script)], cwd=host.ROOT,
                          env={**os.environ, "COMFYUI_DIR": str(host.COMFY_DIR)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    r = json.loads("\n".join(lines[lines.index("{"):]))  # the report is printed last
    # booted as ComfyUI's main.py: torch runs the allocator ComfyUI's cuda_malloc asked for
    assert r.get("allocator") == r.get("allocator_asked"), (script, r.get("allocator"), r.get("allocator_asked"))
    return r


def within_rounding(run: dict) -> bool:
    return run["max_abs_diff_vs_stock"] <= REL_TOL * run["ref_max_abs"]


def test_gpu_smoke():
    r = report("gpu_smoke.py")
    assert [run["path"] for run in r["runs"]] == ["build", "off", "fast", "off", "fast", "fast", "fast"], r["runs"]
    for run in r["runs"]:
        assert run["weight_work"] == {}, run  # ComfyUI never reloads or re-patches the model
        assert within_rounding(run), run
    assert r["factor_device"].startswith("cuda")
    assert r["novram"]["path"] == "full" and r["novram"]["max_abs_diff_vs_stock"] == 0.0, r["novram"]


def test_gpu_memory_check():
    r = report("gpu_memory_check.py")
    assert r["runs"][0]["path"] == "build"
    for run in r["runs"]:
        assert within_rounding(run), run
    for state in ("LOW_VRAM", "NO_VRAM"):
        assert r[state]["path"] == "full" and r[state]["max_abs_diff_vs_stock"] == 0.0, r[state]


def test_gpu_arena_check():
    """An adapter's factors moved through one arena as the memory owner moves them, with the
    stream held back so the copies are still queued while their sources are dropped and new
    device and page-locked blocks are taken and overwritten (scripts/gpu_arena_check.py): after
    the one wait every value is the source's, each tensor keeps its alignment, the host copies
    are page-locked and the device copy is one block."""
    r = report("gpu_arena_check.py")
    assert {(run["way"], run["piece"]) for run in r["runs"]} == {(w, p) for w in ("to host", "back")
                                                                for p in (64 << 20, 64 << 10)}, r["runs"]
    for run in r["runs"]:
        assert run["equal"] == run["aligned"] == run["tensors"] == 1800, run
        if run["way"] == "to host":
            assert run["pinned"] == run["tensors"], run
        else:
            assert run["blocks"] == 1, run


def test_gpu_graph_check():
    r = report("gpu_graph_check.py")
    by_mode = {m["mode"]: m for m in r["modes"]}
    assert by_mode["auto"]["sampling"]["copies"] == by_mode["auto"]["sampling"]["layers"] > 0, by_mode["auto"]
    assert by_mode["unmerged"]["sampling"]["copies"] == 0, by_mode["unmerged"]
    for m in r["modes"]:
        assert m["blocks"], m  # blocks holding adapted layers were captured
        for b in m["blocks"]:
            assert b["ok"], b  # replay equals eager bit for bit; no memory kept per call


def test_gpu_reach_check():
    """A layer ComfyUI computes without its forward (scripts/gpu_reach_check.py): served through
    ComfyUI's cast under dynamic VRAM (where comfy-aimdo is active) and the classic patcher, in
    merged copies and unmerged; the first sampling of an adapter set runs its first model call
    once more, later ones not; nothing re-streamed or left behind."""
    r = report("gpu_reach_check.py")
    for name, config in r["configs"].items():
        tol = REL_TOL * config["ref_max_abs"]
        assert tol < config["missing_vs_stock"], (name, config)  # the layer's adapter shows
        assert "ran again" in config["runs"][0]["reason"], (name, config["runs"][0])  # found on the model's first
        for run in config["runs"]:
            assert run["net"] == 1 and run["uuid_kept"] and run["streamed"] == 0, (name, run)
            assert run["max_abs_diff_vs_stock"] <= tol, (name, run)
            assert run["model_calls"] == config["stock_calls"] + (run["sampling"] == "first" and "ran again" in
                                                                  run["reason"]), (name, run)
            assert run.get("base_after_equal", True), (name, run)


def test_gpu_base_read_check():
    """Where copies get their base weight under real comfy-aimdo (scripts/gpu_base_read_check.py):
    layers it does not hold on the device are read from the model file, in spans of adjacent
    layers, and equal the cast's tensors bit for bit; resident layers and layers a stock LoRA
    patches come through the cast; after an unload the copy choice reads base copies from the file
    and builds merged copies through the cast, each equal to the copy of the cast's weight."""
    r = report("gpu_base_read_check.py")
    if not r["aimdo"]:
        pytest.skip("comfy-aimdo is not active on this machine")
    first, resident, base, merged = r["after_load"], r["resident"], r["base_copies"], r["merged_copies"]
    assert first["layers"] > 0 and first["from_file"] == first["equal_to_cast"] == first["layers"], first
    assert resident["layers"] == first["layers"] and resident["from_file"] == 0, resident
    assert base["from_file"] == base["built"] == base["equal_to_merge_of_cast"] == base["layers"] > 0, base
    assert merged["from_file"] == 0 and merged["built"] == merged["equal_to_merge_of_cast"] == merged["layers"] > 0, \
        merged
    assert r["stock_patched"]["layers"] > 0 and r["stock_patched"]["from_file"] == 0, r["stock_patched"]


def test_gpu_dynamic_moves_check():
    """Factors moved off and back under real comfy-aimdo (scripts/gpu_dynamic_moves_check.py):
    with a budget that holds one adapter, a switch back moves nothing at the node call; the
    sampling brings the used adapter's factors back and the other's leave; every output equals
    stock within fp16 rounding; each adapter's factors are one allocation on the device and
    page-locked pieces on the host that take little more than their bytes; a sweep of an adapter
    moved off runs on its factors brought back to the device before its per-image update binds
    them."""
    r = report("gpu_dynamic_moves_check.py")
    if not r["aimdo"]:
        pytest.skip("comfy-aimdo is not active on this machine")
    assert r["patcher"] == "ModelPatcherDynamic", r["patcher"]
    for run in r["runs"]:
        assert within_rounding(run), run
    first_b = r["runs"][1]
    assert first_b["resident_after"] == {"a": False, "b": True}, first_b
    for run, used, other in ((r["runs"][2], "a", "b"), (r["runs"][3], "b", "a")):
        assert run["path"] == "build" and "moved to cpu" in run["reason"], run
        assert run["moved_at_node"] == {"moved_to_cpu": 0, "moved_back": 0}, run
        assert run["resident_at_node"] == {used: False, other: True}, run
        assert run["moved_in_run"] == {"moved_to_cpu": 1, "moved_back": 1}, run
        assert run["resident_after"] == {used: True, other: False}, run
        assert run["device_after"][used].startswith("cuda"), run
        # one allocation per adapter on the device; on the host page-locked pieces that take
        # little more than the factors (one block would be rounded up to a power of two)
        on, off = run["blocks_after"][used], run["blocks_after"][other]
        assert on["allocations"] == 1 and on["pinned"] is None, run
        assert off["pinned"] is True and off["allocated"] <= off["nbytes"] * 1.05 + 2 ** 20, run
    sw = r["sweep"]
    assert within_rounding(sw), sw
    assert sw["moved_at_node"] == {"moved_to_cpu": 0, "moved_back": 0}, sw
    assert sw["moved_in_run"] == {"moved_to_cpu": 1, "moved_back": 1}, sw
    assert sw["resident_after"] == {"a": True, "b": False} and sw["device_after"]["a"].startswith("cuda"), sw
    # the profiler saw the sampling's copies: each swept layer's down and up coming back once at
    # its start, and no copy per model call (factors bound on the host: one per layer and call,
    # 4 calls)
    assert sw["memcpy"] > 0 and sw["memcpy_pinned_to_device"] <= 2 * sw["swept_layers"], sw



def test_gpu_streamed_update_check():
    """The unmerged weight update where comfy-aimdo streams the weights
    (scripts/gpu_streamed_update_check.py): with the device filled, some layer's update goes in
    place into the weight ComfyUI streams through its cast buffer; ours equals stock within fp16
    rounding, and a base sampling after ours equals the one before it to the bit (no resident
    weight written). A fill where the sampling ran out of memory is skipped by the script."""
    r = report("gpu_streamed_update_check.py")
    if not r["aimdo"]:
        pytest.skip("comfy-aimdo is not active on this machine")
    assert r["patcher"] == "ModelPatcherDynamic", r["patcher"]
    ran = [run for run in r["runs"] if "out_of_memory" not in run]
    assert ran, r["runs"]
    for run in ran:
        assert run["path"] == "build", run
        assert within_rounding(run), run
        assert run["base_after_vs_again"] == 0.0, run
    assert r["runs"][-1]["weight_updates"]["in_place"] > 0, r["runs"]  # some fill made comfy-aimdo stream
