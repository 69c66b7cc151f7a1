"""The real ComfyUI server in a subprocess with this package in custom_nodes/, driven over
HTTP and the websocket only, with the shipped API workflows from workflows/: the demo series
against its stock-LoraLoader twin (saved PNGs compared), the stats and purge routes, a bad
file, build progress, and a clean shutdown (the `server` fixture of conftest.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lora_cache_testkit import demo

# ours vs stock: the same latents up to float rounding (unmerged y + (x A^T) B^T vs merged
# (W + BA) x), decoded and quantised to 8 bits; rounding may flip a pixel by one level.
MAX_LEVEL_DIFF = 1
MAX_FRACTION_DIFFERENT = 0.01

pytestmark = pytest.mark.server


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def image_of(server, prompt_id: str) -> np.ndarray:
    pngs = server.output_images(prompt_id)
    assert len(pngs) == 1
    return pixels(pngs[0])


def assert_same_image(a: np.ndarray, b: np.ndarray, label: str) -> None:
    diff = np.abs(a - b)
    assert a.shape == b.shape == (64, 64, 3), label
    assert diff.max() <= MAX_LEVEL_DIFF, f"{label}: max diff {diff.max()}"
    assert (diff > 0).mean() <= MAX_FRACTION_DIFFERENT, f"{label}: {(diff > 0).mean():.3%} of values differ"


def test_demo_series_paths_and_stock_parity(server):
    rows = demo.run_series(server)
    # what the websocket said for each run, and what the stats route recorded, agree
    paths = ["build", "off", "fast", "fast", "build", "fast"]
    assert [r["path"] for r in rows] == paths
    assert [e["path"] for e in server.get("/lora_cache/stats")["events"][-6:]] == paths
    assert "strength 1->0.6" in rows[3]["reason"]
    assert all(r["node_ms"] is not None for r in rows)
    stats = server.get("/lora_cache/stats")
    assert sorted(a["name"] for a in stats["adapters"]) == ["detail.safetensors", "style.safetensors"]
    assert all(a["bytes"] > 0 and a["device"] == "cpu" for a in stats["adapters"])

    stock = demo.run_series(server, node=demo.STOCK)
    assert [r["path"] for r in stock] == ["-"] * 6  # the stock node sends no event
    ours_img = {r["run"]: image_of(server, r["prompt_id"]) for r in rows}
    stock_img = {r["run"]: image_of(server, r["prompt_id"]) for r in stock}
    for label in ours_img:
        assert_same_image(ours_img[label], stock_img[label], label)
    # the LoRA, its strength and the choice of adapter all show in the pixels
    assert np.abs(ours_img["on"] - ours_img["off"]).max() > 8
    assert np.abs(ours_img["on"] - ours_img["strength 0.6"]).max() > 4
    assert np.abs(ours_img["on"] - ours_img["other adapter"]).max() > 8
    # Each sampling with the adapter on ran merged copies of every layer; the re-enable ran the
    # copies the first run built, so its image is the first's.
    samplings = server.get("/lora_cache/stats")["samplings"][-5:]  # on, on again, 0.6, other, first again
    assert all(s["copies"] == s["layers"] > 0 for s in samplings), samplings
    assert samplings[0]["built"] == samplings[0]["copies"] and samplings[1]["built"] == 0, samplings
    assert_same_image(ours_img["on"], ours_img["on again"], "on again vs on")
    assert_same_image(ours_img["on"], ours_img["first again"], "first again vs on")


def test_bad_file_is_a_node_error_and_server_keeps_serving(server):
    lora_dir = server.base / "models" / "loras"
    (lora_dir / "broken.safetensors").write_bytes((lora_dir / "style.safetensors").read_bytes()[:200])
    res = server.run(demo.workflow(dict(lora_name="broken.safetensors", strength_model=1.0, enabled=True)))
    errors = [d for t, d in res["messages"] if t == "execution_error"]
    assert len(errors) == 1
    assert errors[0]["node_type"] == "LoraCacheLoaderModelOnly"
    assert "broken.safetensors" in errors[0]["exception_message"]
    assert "could not be loaded" in errors[0]["exception_message"]
    hist = server.get(f"/history/{res['prompt_id']}")[res["prompt_id"]]
    assert hist["status"]["status_str"] == "error"
    api_errors = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert api_errors and "broken.safetensors" in api_errors[0]["exception_message"]
    assert "broken.safetensors" not in [a["name"] for a in server.get("/lora_cache/stats")["adapters"]]
    # a file that is not in the loras folder is refused at POST /prompt, before anything runs
    status, body = server.queue(demo.workflow(dict(lora_name="missing.safetensors", strength_model=1.0, enabled=True)))
    assert status == 400 and "2" in body["node_errors"], (status, body)
    assert body["node_errors"]["2"]["class_type"] == "LoraCacheLoaderModelOnly"
    assert "missing.safetensors" in str(body["node_errors"]["2"]["errors"])
    ok = server.run(demo.workflow(dict(lora_name="style.safetensors", strength_model=0.9, enabled=True)))
    assert not [d for t, d in ok["messages"] if t == "execution_error"]
    assert server.get(f"/history/{ok['prompt_id']}")[ok["prompt_id"]]["status"]["status_str"] == "success"
    assert image_of(server, ok["prompt_id"]).shape == (64, 64, 3)


def test_purge_route_empties_cache_and_next_run_rebuilds(server):
    server.run(demo.workflow(dict(lora_name="style.safetensors", strength_model=0.8, enabled=True)))
    assert server.get("/lora_cache/stats")["adapters"]
    status, body = server.request("POST", "/lora_cache/purge", {"path": "/etc/passwd"})
    assert status == 200 and body["purged"] >= 1
    assert server.get("/lora_cache/stats")["adapters"] == []
    # same prompt again: the purge changed the node's fingerprint, so it runs and rebuilds
    server.run(demo.workflow(dict(lora_name="style.safetensors", strength_model=0.8, enabled=True)))
    ev = server.get("/lora_cache/stats")["events"][-1]
    assert ev["path"] == "build" and ev["reason"].startswith("first use")


def test_build_progress_reaches_the_client(server):
    """A build reports per-layer progress through comfy.utils.ProgressBar; the server sends it
    to the queuing client as websocket "progress" messages for our node."""
    server.request("POST", "/lora_cache/purge")
    prompt = demo.workflow(dict(lora_name="detail.safetensors", strength_model=0.7, enabled=True))
    node_id = next(k for k, v in prompt.items() if v["class_type"] == demo.OURS)
    res = server.run(prompt)
    events = [d for t, d in res["messages"] if t == "lora_cache.event"]
    assert [e["path"] for e in events] == ["build"]
    progress = [d for t, d in res["messages"] if t == "progress" and d["node"] == node_id]
    layers = next(a["layers"] for a in server.get("/lora_cache/stats")["adapters"] if a["name"] == "detail.safetensors")
    assert progress, "no progress message for the LoRA node"
    assert all(p["max"] >= layers for p in progress)
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == progress[-1]["max"]
    # a fast re-enable builds nothing, so it reports no progress
    server.run(demo.workflow(dict(lora_name="detail.safetensors", strength_model=0.7, enabled=False)))
    again = server.run(demo.workflow(dict(lora_name="detail.safetensors", strength_model=0.7, enabled=True)))
    assert [d["path"] for t, d in again["messages"] if t == "lora_cache.event"] == ["fast"]
    assert not [d for t, d in again["messages"] if t == "progress" and d["node"] == node_id]


def test_saved_mode_value_dynamic_runs_unmerged_and_unknown_mode_is_refused(server):
    """A workflow saved with the unmerged mode's former value ("dynamic") still runs, unmerged;
    a mode the node does not know is refused at POST /prompt, naming it."""
    res = server.run(demo.workflow(dict(lora_name="style.safetensors", strength_model=0.8, enabled=True,
                                        mode="dynamic")))
    assert not [d for t, d in res["messages"] if t == "execution_error"], res["messages"]
    sampling = server.get("/lora_cache/stats")["samplings"][-1]
    assert sampling["copies"] == 0 and sampling["reason"].endswith("(mode unmerged)"), sampling
    status, body = server.queue(demo.workflow(dict(lora_name="style.safetensors", strength_model=0.8,
                                                   enabled=True, mode="fastest")))
    assert status == 400 and "unknown mode 'fastest'" in str(body["node_errors"]["2"]["errors"]), (status, body)
