"""The real ComfyUI server in a subprocess with this package in custom_nodes/, driven over
HTTP and the websocket only: the demo series, the stats and purge routes, a bad file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import demo
from comfy_server import ComfyServer, make_base_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_dir(tmp_path_factory.mktemp("server_base"))
    demo.make_files(base)
    s = ComfyServer(base).start()
    yield s
    rc = s.stop()
    assert rc is not None  # the server went away


def latest_latent(base: Path) -> torch.Tensor:
    files = sorted((base / "output").glob("lora_cache_demo_*.latent"), key=lambda p: p.stat().st_mtime_ns)
    return load_file(str(files[-1]))["latent_tensor"]


def test_demo_series_paths_and_stock_parity(server):
    rows = demo.run_series(server)
    assert [r["path"] for r in rows] == ["build", "off", "fast", "fast", "build", "fast"]
    assert "strength 1->0.6" in rows[3]["reason"]
    assert all(r["node_ms"] is not None for r in rows)
    stats = server.get("/lora_cache/stats")
    assert sorted(a["name"] for a in stats["adapters"]) == ["detail.safetensors", "style.safetensors"]
    assert all(a["bytes"] > 0 and a["device"] == "cpu" for a in stats["adapters"])
    # each setting's saved latent equals the stock LoraLoader's for the same seed
    for label, inputs in demo.SERIES:
        server.run(demo.workflow(inputs))
        ours = latest_latent(server.base)
        server.run(demo.workflow(inputs, node="LoraLoaderModelOnly"))
        stock = latest_latent(server.base)
        assert torch.allclose(ours, stock, rtol=1e-4, atol=2e-4), label


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
    assert "broken.safetensors" not in [a["name"] for a in server.get("/lora_cache/stats")["adapters"]]
    ok = server.run(demo.workflow(dict(lora_name="style.safetensors", strength_model=0.9, enabled=True)))
    assert not [d for t, d in ok["messages"] if t == "execution_error"]


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
