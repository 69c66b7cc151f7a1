"""Faults on the real in-process host: an interrupt in the middle of building an
adapter or of sampling, a LoRA file deleted or rewritten between runs, and a model that
ComfyUI frees. None may leave a half-built entry, a stale adapter or a leak."""
from __future__ import annotations

import contextlib
import gc
import weakref

import comfy.model_management as mm
import comfy.utils
import pytest
import torch
from comfy_execution.utils import get_executing_context

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close


@contextlib.contextmanager
def interrupt_at(node: str, when):
    """Interrupts the prompt the way the server does it: ComfyUI's progress hook checks
    model_management's interrupt flag on every progress update (main.py hijack_progress).
    `when(value, total)` picks the update of node `node` at which POST /interrupt 'arrives'."""
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        nid = node_id if node_id is not None else (ctx.node_id if ctx is not None else None)
        seen.append((nid, value, total))
        if nid == node and when(value, total):
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)


def interrupted(h, prompt) -> None:
    h.run(prompt, expect_error=True)
    kinds = [e for e, _ in h.executor.status_messages]
    assert "execution_interrupted" in kinds, kinds


def layer_forwards(h):
    from lora_cache_loader.lora_cache import layers
    mods = [m for e in h.lc.STORE.entries() for _, m, _ in e.modules()]
    return [m for m in mods if layers.is_installed(m) or "forward" in m.__dict__]


@pytest.fixture(scope="module")
def lora(host):
    name = "fault.safetensors"
    tiny_models.write_lora(host.loras / name, tiny_models.sd_lora_state_dict(host.unet_sd, seed=51))
    return name


@pytest.mark.parametrize("point", ["first layer", "all layers built"])
def test_interrupt_while_building_leaves_nothing(fresh, lora, point):
    h = fresh
    stock = h.run(wf.sd([wf.stock(lora, 0.9)]))["out"]
    h.new_executor()
    # The LoRA node ("l0") reports its build per layer batch; interrupt at its first update,
    # or at its last one, when every factor exists but the entry is not stored yet.
    when = (lambda v, t: v == 0) if point == "first layer" else (lambda v, t: v == t)
    n_events = len(h.lc.events._recent)
    with interrupt_at("l0", when) as seen:
        interrupted(h, wf.sd([wf.ours(lora, 0.9)]))
    assert any(n == "l0" for n, _, _ in seen)
    assert not [e for e in h.lc.STORE.entries() if e.lora == lora]
    assert len(h.lc.events._recent) == n_events  # no event: the node never finished
    out = h.run(wf.sd([wf.ours(lora, 0.9)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and ev["reason"].startswith("first use"), ev
    assert close(out, stock)


def test_interrupt_while_sampling_then_next_runs_correct(fresh, lora):
    h = fresh
    stock = h.run(wf.sd([wf.stock(lora, 0.9)], seed=5))["out"]
    base = h.run(wf.sd([], seed=5))["out"]
    h.new_executor()
    prompt = wf.sd([wf.ours(lora, 0.9)], seed=5, base_branch=True)
    prompt["5"]["inputs"]["steps"] = 6
    with interrupt_at("5", lambda v, t: 0 < v < t) as seen:
        interrupted(h, prompt)
    assert any(n == "5" and 0 < v < t for n, v, t in seen)  # it really stopped mid-sampling
    assert h.last_event()["path"] == "build"  # the node had finished; its entry is whole
    assert not layer_forwards(h)  # ComfyUI's cleanup ran our ON_CLEANUP: layers are bare
    entry = next(e for e in h.lc.STORE.entries() if e.lora == lora)
    assert entry.live
    got = h.run(wf.sd([wf.ours(lora, 0.9)], seed=5, base_branch=True))
    assert close(got["out"], stock) and torch.equal(got["base"], base)
    # ComfyUI keeps the LoRA node's output (same inputs), so only KSampler runs again, with the
    # same patcher and the same cache entry: nothing was rebuilt, and the output is correct.
    assert [e for e in h.lc.STORE.entries() if e.lora == lora] == [entry]
    assert not layer_forwards(h)
    # a strength change makes the node run again: fast, on the same entry
    got = h.run(wf.sd([wf.ours(lora, 0.7)], seed=5, base_branch=True))
    assert h.last_event()["path"] == "fast", h.last_event()
    assert close(got["out"], h.run(wf.sd([wf.stock(lora, 0.7)], seed=5))["out"])
    assert torch.equal(got["base"], base)


def test_file_deleted_between_runs_is_an_error_never_stale(fresh, lora):
    h = fresh
    name = "deleted.safetensors"
    path = h.loras / name
    tiny_models.write_lora(path, tiny_models.sd_lora_state_dict(h.unet_sd, seed=52))
    prompt = wf.sd([wf.ours(name)])
    outputs = h.validate(prompt)
    h.run(prompt)
    assert [e for e in h.lc.STORE.entries() if e.lora == name]
    path.unlink()
    # the same prompt again (validated before the delete): the node must run and fail.
    # A fresh dict each time, as the server gets: ComfyUI stores IS_CHANGED in the prompt dict.
    err = h.run(wf.sd([wf.ours(name)]), expect_error=True, outputs=outputs)
    assert name in err["exception_message"] and "not found" in err["exception_message"], err
    # a new file under the old name: rebuilt from the new content, equal to stock
    tiny_models.write_lora(path, tiny_models.sd_lora_state_dict(h.unet_sd, seed=53))
    out = h.run(wf.sd([wf.ours(name)]))["out"]
    ev = h.last_event()
    assert ev["path"] == "build" and "file changed on disk" in ev["reason"], ev
    assert close(out, h.run(wf.sd([wf.stock(name)]))["out"])


def test_file_rewritten_after_node_before_sampling_refuses(fresh):
    """The node ran and returned its patcher; the file changes before KSampler samples:
    ComfyUI's ON_PRE_RUN gets our check and the sampling fails instead of using old factors."""
    h = fresh
    import nodes

    name = "late.safetensors"
    path = h.loras / name
    tiny_models.write_lora(path, tiny_models.sd_lora_state_dict(h.unet_sd, seed=54))
    model = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet("tiny_sd.safetensors", "default")[0]
    patched, _, ev = h.lc.apply(model, None, name, 1.0, 0.0)
    assert ev.path == "build"
    tiny_models.write_lora(path, tiny_models.sd_lora_state_dict(h.unet_sd, seed=55))
    cond = [[torch.zeros(1, 4, 1024), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(h.lc.LoraCacheError, match="changed on disk after the node ran"):
        nodes.common_ksampler(patched, 1, 1, 1.5, "euler", "normal", cond, cond, latent)
    assert not layer_forwards(h)


def test_freed_model_releases_entries_and_factor_memory(fresh, lora):
    """A model that ComfyUI (and everyone else) drops takes its cache entries and their factor
    tensors with it: the store only holds the model weakly."""
    h = fresh
    import nodes

    model = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet("tiny_sd.safetensors", "default")[0]
    patched, _, ev = h.lc.apply(model, None, lora, 1.0, 0.0)
    assert ev.path == "build"
    entries = [e for e in h.lc.STORE.entries() if e.model_ref() is model.model]
    assert len(entries) == 1 and entries[0].nbytes > 0
    factor = weakref.ref(next(iter(entries[0].layers.values()))[0].down)
    base_model = weakref.ref(model.model)
    n_before = len(h.lc.STORE.entries())
    del model, patched, entries, ev
    gc.collect()
    assert base_model() is None
    assert len(h.lc.STORE.entries()) == n_before - 1
    assert factor() is None
    assert not [a for a in h.lc.stats()["adapters"] if a["model"] is None]


def test_model_freed_by_comfyui_after_a_run(fresh, lora):
    """The same through ComfyUI's own lifecycle: a prompt runs, the executor's cache goes
    (a new prompt without that model), ComfyUI unloads and cleans up its loaded models."""
    h = fresh
    h.run(wf.sd([wf.ours(lora)]))
    entry = next(e for e in h.lc.STORE.entries() if e.lora == lora)
    factor = weakref.ref(next(iter(entry.layers.values()))[0].down)
    model = entry.model_ref
    del entry
    h.new_executor()
    mm.unload_all_models()
    mm.cleanup_models_gc()
    mm.cleanup_models()
    gc.collect()
    assert model() is None
    assert not [e for e in h.lc.STORE.entries() if e.lora == lora]
    assert factor() is None
