"""The main job: a real ComfyUI server with this package, a generated tiny model and two LoRA
files, and a short series of queue runs toggling and switching adapters. Prints, per run, the
path the LoRA Cache Loader took, why, the node's time, the whole run's time and what the
sampling ran (merged copies, unmerged layers, what was built)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import host
from .server import ComfyServer, make_base_dir

SERIES = [
    ("on", dict(lora_name="style.safetensors", strength_model=1.0, enabled=True)),
    ("off", dict(lora_name="style.safetensors", strength_model=1.0, enabled=False)),
    ("on again", dict(lora_name="style.safetensors", strength_model=1.0, enabled=True)),
    ("strength 0.6", dict(lora_name="style.safetensors", strength_model=0.6, enabled=True)),
    ("other adapter", dict(lora_name="detail.safetensors", strength_model=1.0, enabled=True)),
    ("first again", dict(lora_name="style.safetensors", strength_model=1.0, enabled=True)),
]


OURS = "LoraCacheLoaderModelOnly"
STOCK = "LoraLoaderModelOnly"
WORKFLOWS = host.ROOT / "workflows"
# The shipped API-format workflows: ours and its stock-LoraLoader twin. They sit in api/
# because ComfyUI lists every .json directly in workflows/ as a template for the canvas.
API_FILES = {OURS: "api/lora_cache_demo.json", STOCK: "api/stock_lora_demo.json"}


def load_api(node: str = OURS) -> dict:
    return json.loads((WORKFLOWS / API_FILES[node]).read_text())


def workflow(lora_inputs: dict, node: str = OURS, seed: int = 7) -> dict:
    """The shipped workflow for `node` with the LoRA node's inputs and the seed set.

    The stock twin has no `enabled` input: "off" there means the LoRA node is left out
    (bypassed), and the sampler takes the loader's model directly."""
    p = load_api(node)
    lora_id = next(k for k, v in p.items() if v["class_type"] == node)
    sampler = next(v for v in p.values() if v["class_type"] == "KSampler")
    sampler["inputs"]["seed"] = seed
    inputs = dict(lora_inputs)
    if node == STOCK and not inputs.pop("enabled", True):
        sampler["inputs"]["model"] = p[lora_id]["inputs"]["model"]
        del p[lora_id]
        return p
    p[lora_id]["inputs"].update(inputs)
    return p


def make_files(base: Path) -> None:
    host.boot()
    from . import tiny_models

    tiny_models.write_sd_unet(base / "models/diffusion_models/tiny_sd.safetensors", seed=0)
    tiny_models.write_taesd(base / "models/vae_approx")
    unet = {k: v.half().float() for k, v in tiny_models.sd_unet_state_dict(seed=0).items()}
    tiny_models.write_lora(base / "models/loras/style.safetensors", tiny_models.sd_lora_state_dict(unet, seed=1))
    tiny_models.write_lora(base / "models/loras/detail.safetensors",
                           tiny_models.sd_lora_state_dict(unet, seed=2, kinds=("attn",)))


def run_series(server: ComfyServer, node: str = OURS) -> list[dict]:
    rows = []
    for label, inputs in SERIES:
        res = server.run(workflow(inputs, node))
        errors = [d for t, d in res["messages"] if t == "execution_error"]
        if res["status"] != 200 or errors:
            raise RuntimeError(f"run '{label}' failed: {res.get('body') or errors}")
        # The node's own websocket message for this run (the stock node sends none).
        evs = [d for t, d in res["messages"] if t == "lora_cache.event"]
        ev = evs[-1] if evs else None
        samplings = [d for t, d in res["messages"] if t == "lora_cache.sampling"]
        rows.append({"run": label, "path": ev["path"] if ev else "-", "reason": ev["reason"] if ev else "-",
                     "node_ms": ev["ms"] if ev else None, "run_s": res["seconds"],
                     "sampling": samplings[-1]["reason"] if samplings else None, "prompt_id": res["prompt_id"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI base directory")
    args = ap.parse_args(argv)

    base = make_base_dir(Path(tempfile.mkdtemp(prefix="lora_cache_demo_")))
    make_files(base)
    print(f"ComfyUI base directory: {base}")
    server = ComfyServer(base)
    with server:
        print(f"ComfyUI {server.get('/system_stats')['system']['comfyui_version']} running at {server.url}")
        rows = run_series(server)
        stock = run_series(server, node=STOCK)
        stats = server.get("/lora_cache/stats")
    print()
    print(f"{'run':<15} {'path':<6} {'node ms':>9} {'run s':>7}  {'stock run s':>11}  reason")
    for r, s in zip(rows, stock, strict=True):
        node_ms = f"{r['node_ms']:.3f}" if r["node_ms"] is not None else "-"
        print(f"{r['run']:<15} {r['path']:<6} {node_ms:>9} {r['run_s']:>7.3f}  {s['run_s']:>11.3f}  {r['reason']}")
        if r["sampling"]:
            print(f"{'':<15} sampling: {r['sampling']}")
    print()
    print("cached adapters:", ", ".join(f"{a['name']} ({a['bytes'] // 1024} KiB on {a['device']})"
                                         for a in stats["adapters"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "stock": stock, "stats": stats}, indent=1))
    if not args.keep:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
