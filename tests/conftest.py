"""Fixtures: the in-process ComfyUI host (`host`, `fresh`) and one real ComfyUI server process
shared by the server tests (`server`)."""
import pytest

from lora_cache_testkit import demo
from lora_cache_testkit.harness import Host
from lora_cache_testkit.server import ComfyServer, make_base_dir


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="module")
def pkg(host):
    """Our package's modules as ComfyUI loaded them (through custom_nodes/)."""
    class P:
        from lora_cache_loader.lora_cache import (
            adapters,
            arena,
            copies,
            forms,
            key_map,
            layers,
            low_rank,
            weight_update,
        )
    return P


@pytest.fixture(scope="module")
def sd_patcher(host):
    """The tiny SD UNet in float32 through ComfyUI's loader (the layer-level tests' model)."""
    import comfy.sd
    import torch
    return comfy.sd.load_diffusion_model_state_dict(dict(host.unet_sd), model_options={"dtype": torch.float32})


@pytest.fixture(scope="module")
def flux_patcher():
    """The tiny Flux model (fused qkv and linear1 weights) with random weights."""
    from lora_cache_testkit import tiny_models
    return tiny_models.flux_patcher(seed=0)


@pytest.fixture
def fresh(host):
    """A fresh executor (no node outputs cached), an empty adapter cache, and no model loaded.

    The harness keeps its tiny CLIP and Flux for the session, so a clone of one that a test
    loaded can outlive the patchers it came from; ComfyUI then counts that loaded model as
    leaked and runs a full garbage collection on every later load (0.2 s each here)."""
    import comfy.model_management
    host.new_executor()
    host.lc.purge()
    comfy.model_management.unload_all_models()
    yield host
    host.lc.purge()


def _model_files(s: ComfyServer) -> set:
    return set((s.base / "models").rglob("*"))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server process for all server tests of the session (starting one costs
    seconds): this package in custom_nodes/, the demo's model files, the CPU handled like a GPU.
    `server` cleans up around each test. At the end it must stop as a user stops it (Ctrl-C,
    exit status 0)."""
    base = make_base_dir(tmp_path_factory.mktemp("server_base"), cpu_as_device=True)
    demo.make_files(base)
    s = ComfyServer(base).start()
    s.demo_files = _model_files(s)
    yield s
    s.stop()
    assert s.stopped_cleanly(), f"ComfyUI did not shut down cleanly (rc={s.proc.returncode}); see {s.log_path}"


def _reset(s: ComfyServer) -> None:
    """Nothing queued, only the demo's model files, no adapter cached (a purge also makes
    ComfyUI run our nodes again rather than serve their cached outputs)."""
    s.wait_idle()
    for extra in sorted(_model_files(s) - s.demo_files, reverse=True):
        if extra.is_dir():
            extra.rmdir()
        else:
            extra.unlink()
    status, body = s.request("POST", "/lora_cache/purge")
    assert status == 200, (status, body)


@pytest.fixture
def server(comfy_server):
    """The shared server, as if just started for this test."""
    s = comfy_server
    assert s.proc.poll() is None, f"the shared ComfyUI server exited ({s.proc.returncode}); see {s.log_path}"
    _reset(s)
    yield s
    _reset(s)
