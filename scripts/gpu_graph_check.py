"""GPU check: blocks that run our forward give the same result captured in a CUDA graph and
replayed as run eagerly, for merged copies and for the unmerged forms.

Current ComfyUI captures a block in a CUDA graph once its weights are resident and none of its
layers has a weight or bias function, then replays it without calling any Python forward. Our
installed forward must survive that: nothing in it may synchronise with the host or copy from
it while capturing, keep state that differs between the captured call and a replay, or hold on
to memory from one call to the next.

The tiny SD-type model runs on the GPU in fp16 with a LoRA on its attention, feed-forward and
resnet convolutions, sampled through ComfyUI (comfy.sample) with our loader in mode `auto`
(every layer gets a merged copy) and mode `unmerged` (the unmerged forms). On the first model
call, hooks record each top-level block that holds an adapted layer: its inputs and its eager
output. Each such block is then captured (torch.cuda.graph), replayed on the recorded input and
on a perturbed one, and compared bit for bit with eager calls of the same inputs; five more eager
calls must leave the device's allocated memory where it was. Prints a JSON report; exit status 1 on a failure.

On a GPU machine, from the repository root:
COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_graph_check.py
"""
from __future__ import annotations

import json
import sys

from lora_cache_testkit import host

host.boot(cpu=False)

import torch

from lora_cache_testkit.sampling import tiny_fp16_model_and_lora, tiny_sd_sampler


def _blocks(diffusion_model: torch.nn.Module, is_installed) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's blocks (ResBlock, SpatialTransformer, ...) that hold a layer running our
    forward. ComfyUI calls the members of a TimestepEmbedSequential one by one, so those are
    the blocks."""
    out = []
    for group in ("input_blocks", "middle_block", "output_blocks"):
        parent = getattr(diffusion_model, group, None)
        if parent is None:
            continue
        seqs = list(parent.named_children()) if group != "middle_block" else [("", parent)]
        for seq_name, seq in seqs:
            for name, block in seq.named_children():
                if any(is_installed(m) for m in block.modules()):
                    out.append((".".join(x for x in (group, seq_name, name) if x), block))
    return out


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def _check_block(name: str, block: torch.nn.Module, args: tuple, kwargs: dict, first_out: torch.Tensor) -> dict:
    res: dict = {"block": name}
    static = [_clone(a) for a in args]
    static_kw = {k: _clone(v) for k, v in kwargs.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up off the capture, as torch asks
            block(*static, **static_kw)
    torch.cuda.current_stream().wait_stream(stream)
    eager = block(*args, **kwargs)
    # For information: the sampling's own first call against a later eager call of the same
    # input (cuBLAS may pick another kernel on a first call: a rounding, not a graph matter).
    res["first_call_vs_eager_max_abs"] = float((first_out.float() - eager.float()).abs().max())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = block(*static, **static_kw)
    except Exception as e:  # an illegal call while capturing (a sync, a host copy): the finding
        res.update(ok=False, error=f"capture failed: {type(e).__name__}: {e}")
        return res
    graph.replay()
    torch.cuda.synchronize()
    same_input = torch.equal(captured, eager)
    res["replay_vs_eager_max_abs"] = float((captured.float() - eager.float()).abs().max())
    # A second input through the same graph: the replay must follow the input, not the capture.
    x2 = args[0] + 0.1 * torch.randn_like(args[0])
    static[0].copy_(x2)
    graph.replay()
    eager2 = block(x2, *args[1:], **kwargs)
    torch.cuda.synchronize()
    same_other = torch.equal(captured, eager2)
    res["replay_vs_eager_other_input_max_abs"] = float((captured.float() - eager2.float()).abs().max())
    del graph, captured
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(5):
        block(*args, **kwargs)
    torch.cuda.synchronize()
    res["allocated_growth_bytes"] = torch.cuda.memory_allocated() - before
    res["ok"] = bool(same_input and same_other and res["allocated_growth_bytes"] == 0)
    return res


def check_mode(lc, base, sample, mode: str) -> dict:
    m, _, ev = lc.apply(base, None, "a.safetensors", 1.0, 0.0, True, mode)
    m = m.clone()
    report: dict = {"mode": mode, "path": ev.path, "reason": ev.reason, "blocks": []}
    recorded: dict = {}

    def wrapper(apply_model, a):
        if report["blocks"] or recorded.get("done"):
            return apply_model(a["input"], a["timestep"], **a["c"])
        dm = m.model.diffusion_model
        blocks = _blocks(dm, lc.layers.is_installed)
        handles = []
        for name, block in blocks:
            def pre(mod, args, kwargs, name=name):
                recorded.setdefault(name, {})["in"] = ([_clone(x) for x in args],
                                                       {k: _clone(v) for k, v in kwargs.items()})
            def post(mod, args, kwargs, out, name=name):
                if isinstance(out, torch.Tensor):
                    recorded[name]["out"] = out.clone()
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        try:
            out = apply_model(a["input"], a["timestep"], **a["c"])
        finally:
            for h in handles:
                h.remove()
        recorded["done"] = True
        with torch.no_grad():
            for name, block in blocks:
                if "out" not in recorded.get(name, {}):
                    continue  # not called as a module, or not a tensor out
                args, kwargs = recorded[name]["in"]
                report["blocks"].append(_check_block(name, block, tuple(args), kwargs, recorded[name]["out"]))
        return out

    m.set_model_unet_function_wrapper(wrapper)
    sample(m)
    report["sampling"] = (lc.stats().get("samplings") or [{}])[-1]
    report["ok"] = bool(report["blocks"]) and all(b["ok"] for b in report["blocks"])
    return report


def main() -> int:
    lc = host.load_package().lora_cache
    base, _ = tiny_fp16_model_and_lora()
    sample = tiny_sd_sampler()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **host.allocator_report(),
              "modes": []}
    for mode in ("auto", "unmerged"):
        report["modes"].append(check_mode(lc, base, sample, mode))
        lc.purge()
    report["ok"] = all(r["ok"] for r in report["modes"])
    print(json.dumps(report, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
