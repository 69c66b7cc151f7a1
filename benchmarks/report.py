"""Renders benchmarks/bench.py's results.json as RESULTS.md (tables, device, versions, the exact
command) and a PNG chart. Runs anywhere (no GPU):

    python3 benchmarks/report.py RESULTS_JSON [--md benchmarks/RESULTS.md] [--png benchmarks/results.png]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

OPS = ["first apply", "off", "re-enable", "strength change", "switch"]
MODES = ["base", "off", "dynamic", "auto", "merged", "merged (cache, in place)", "merged (ours, mode merged)"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=2, unit=""):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}{unit}"


def op_stats(rows, op):
    sel = [r for r in rows if r["op"] == op]
    return {"n": len(sel), "node_ms": med([r["node_ms"] for r in sel]), "run_s": med([r["run_s"] for r in sel]),
            "path": sorted({r.get("path", "") for r in sel}) if sel else [],
            "work": sel[0]["weight_work"] if sel else {},
            "rel": med([r.get("rel_err_vs_stock") for r in sel]),
            "bit": all(r.get("bit_equal_stock") for r in sel) if sel else None}


def pct(a, b):
    return None if a is None or b in (None, 0) else (a / b - 1.0) * 100.0


def work_str(w):
    return ", ".join(f"{k} {v}" for k, v in sorted(w.items())) or "none"


def render(r: dict, cmd: str) -> str:
    out = []
    w = out.append
    w("# Benchmark: LoRA Cache Loader vs the stock LoRA loader\n")
    w(f"- Device: **{r['device']}**; torch {r['torch']}" + (f" (CUDA {r['cuda']})" if r.get("cuda") else "")
      + f"; ComfyUI {r['comfyui']}; ComfyUI vram state {r['vram_state']}; run started {r['started']}.")
    w(f"- Command (on the device machine, from the repository root, with ComfyUI at `$COMFYUI_DIR`): "
      f"`{r['command']}`; this file: `{cmd}`.")
    w("- Models: ComfyUI's own `supported_models.SDXL` / `Flux` classes with random weights allocated on the "
      "GPU; rank-32 LoRA files (alpha 32) on every Linear of the transformer blocks (SDXL kohya names, Flux "
      "diffusers names with q/k/v mapped onto the fused weights); 1024x1024 latents (SDXL cfg 7: batch 2, "
      "Flux cfg 1: batch 1). Stock = ComfyUI's `LoraLoaderModelOnly` logic (`load_lora_for_models`); ours = "
      "`lora_cache.apply` (the node's body).")
    w("- A *run* is the node plus a 1-step `comfy.sample.sample`, which loads the model through "
      "`load_models_gpu` as a queue run does; times are medians over the repeated toggles (n per row). "
      "*Weight work* counts ComfyUI's own weight moves (model loads, weight restores, patched weights).\n")
    for m in r["models"].values():
        label = m["label"]
        w(f"## {label} ({m['dtype']}, {m['params'] / 1e9:.2f}B parameters, {m['block_linears']} LoRA layers, "
          f"file {m['lora_file_mb']:.0f} MiB)\n")
        w("### Toggles: node time and whole-run time\n")
        w("| operation | stock node ms | stock run s | ours node ms | ours run s | run speed-up | ours path | "
          "weight work stock / ours | ours vs stock output (rel. L2) |")
        w("|---|---|---|---|---|---|---|---|---|")
        for op in OPS:
            s, o = op_stats(m["stock"], op), op_stats(m["ours"], op)
            sp = (s["run_s"] / o["run_s"]) if s["run_s"] and o["run_s"] else None
            ex = "bit-equal" if op == "off" and o["bit"] else ("–" if o["rel"] is None else f"{o['rel']:.1e}")
            w(f"| {op} | {f(s['node_ms'], 1)} (n={s['n']}) | {f(s['run_s'], 3)} | {f(o['node_ms'], 3)} (n={o['n']}) | "
              f"{f(o['run_s'], 3)} | {f(sp, 1, 'x')} | {'/'.join(o['path'])} | {work_str(s['work'])} / "
              f"{work_str(o['work'])} | {ex} |")
        w("")
        if m.get("ours_merged"):
            w("### Toggles in merged mode (the node's `mode` merged: factors merged in place per sampling)\n")
            w("| operation | stock run s | ours (merged) node ms | ours (merged) run s | run speed-up | path "
              "| weight work |")
            w("|---|---|---|---|---|---|---|")
            for op in OPS:
                s_, o = op_stats(m["stock"], op), op_stats(m["ours_merged"], op)
                sp = (s_["run_s"] / o["run_s"]) if s_["run_s"] and o["run_s"] else None
                w(f"| {op} | {f(s_['run_s'], 3)} | {f(o['node_ms'], 3)} (n={o['n']}) | {f(o['run_s'], 3)} | "
                  f"{f(sp, 1, 'x')} | {'/'.join(o['path'])} | {work_str(o['work'])} |")
            w("")
        if m.get("auto_samplings"):
            w("### auto: what the cost model chose per sampling\n")
            w("| # | form | sampling ms | reason |")
            w("|---|---|---|---|")
            for i, smp in enumerate(m["auto_samplings"]):
                w(f"| {i + 1} | {smp['form']} | {f(smp['ms'], 1)} | {smp['reason']} |")
            w("")
        w("### Per step and per 20-step image (1024x1024)\n")
        per = m["per_step"]
        base = per.get("base", {}).get("step_ms")
        merged = per.get("merged", {}).get("step_ms")
        w("| mode | step ms (median) | vs base | image s | layer wrappers in the call path | note |")
        w("|---|---|---|---|---|---|")
        for mode in MODES:
            p = per.get(mode)
            if p is None:
                continue
            note = p.get("path", "")
            if mode == "merged":
                note = "stock LoRA merged by ComfyUI (after its reload)"
            if mode == "merged (cache, in place)":
                note = (f"lora_cache.merge from the cached factors: merge {f(p['merge_ms'], 1)} ms + restore "
                        f"{f(p['restore_ms'], 1)} ms (copies on {p['backup_where']}), no reload")
            if mode == "off":
                note = "adapter cached, disabled; same patcher as base: " + str(p.get("same_patcher_as_base"))
            if mode == "auto":
                note = "the node in auto (form chosen per sampling by measured cost)"
            if mode == "merged (ours, mode merged)":
                note = "the node in mode merged (merge + restore inside each sampling, after a stock reload)"
            w(f"| {mode} | {f(p['step_ms'])} | {f(pct(p['step_ms'], base), 1, '%')} | {f(p['image_s'], 3)} | "
              f"{p['wrappers_in_call_path']} | {note} |")
        w("")
        dyn = per.get("dynamic", {}).get("step_ms")
        if dyn and merged:
            w(f"Dynamic per-step overhead over the stock-merged model (eager, inside sampling): "
              f"**{pct(dyn, merged):+.1f}%**.\n")
        c = m["cache"]
        w(f"Cache memory: {c['factor_bytes'] / 2**20:.0f} MiB of factors for {len(c['entries'])} adapters on "
          f"{c['entries'][0]['device'] if c['entries'] else '–'} (allocator delta "
          f"{f((c['gpu_bytes_allocated_delta'] or 0) / 2**20, 0)} MiB); pinned host memory: "
          f"{c['pinned_host_bytes']} bytes.\n")
        fm = m.get("forms")
        if fm:
            w("### Forms of the dynamic forward (whole diffusion model, one forward)\n")
            w(f"{fm['layers']} layers, {fm['factors']} factors. Eager: CUDA-event time of one forward, median of "
              f"{fm['eager_rounds']} interleaved rounds of {fm['eager_iters']}; graph: the same forward captured "
              f"as a CUDA graph, median of {fm['graph_iters']} replays (GPU time without launch overhead). "
              f"Relative L2 error against the model with the update merged into its weights.\n")
            rows = fm["rows"]
            b_e, b_g = rows["base"]["eager_ms"], rows["base"].get("graph_ms")
            w("| form | eager ms | vs base | graph ms | vs base | rel. error vs merged |")
            w("|---|---|---|---|---|---|")
            for name, row in rows.items():
                w(f"| {name} | {f(row['eager_ms'])} | {f(pct(row['eager_ms'], b_e), 1, '%')} | "
                  f"{f(row.get('graph_ms'))} | {f(pct(row.get('graph_ms'), b_g), 1, '%')} | "
                  f"{row['rel_err_vs_merged']:.1e} |")
            w("")
            w(f"Merge into the weights from the cached factors (lora_cache.merge, in place): "
              f"{f(fm['merge_ms'], 1)} ms (first time, allocating the copies: {f(fm['merge_ms_first'], 1)} ms); "
              f"exact restore from a copy on the {fm['backup_where']}: {f(fm['restore_ms'], 1)} ms "
              f"({fm['backup_bytes'] / 2**30:.1f} GiB of touched weights); output after restore bit-equal to before: "
              f"{fm['restore_output_bit_equal']}."
              + (f" With the copies in pinned host memory: restore {f(fm['restore_ms_host_copy'], 1)} ms "
                 f"(merge {f(fm['merge_ms_host_copy'], 0)} ms, most of it pinning the memory)."
                 if "restore_ms_host_copy" in fm else "")
              + f" The augk form keeps [W | B] copies: {fm['augk_extra_bytes'] / 2**30:.2f} GiB.\n")
    return "\n".join(out) + "\n"


def chart(r: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(r["models"])
    fig, axes = plt.subplots(len(kinds), 2, figsize=(13, 4.5 * len(kinds)), squeeze=False)
    axes = [ax for row in axes for ax in row]
    for i, kind in enumerate(kinds):
        m = r["models"][kind]
        ax = axes[2 * i]
        x = range(len(OPS))
        s = [op_stats(m["stock"], op)["run_s"] or 0 for op in OPS]
        o = [op_stats(m["ours"], op)["run_s"] or 0 for op in OPS]
        ax.bar([j - 0.2 for j in x], s, 0.4, label="stock LoraLoader")
        ax.bar([j + 0.2 for j in x], o, 0.4, label="LoRA Cache Loader")
        ax.set_xticks(list(x))
        ax.set_xticklabels(OPS, rotation=20)
        ax.set_ylabel("run time, s (node + load + 1 step)")
        ax.set_title(f"{m['label']}: toggle runs")
        ax.legend()
        ax = axes[2 * i + 1]
        per = m["per_step"]
        modes = [k for k in MODES if k in per]
        ax.bar(range(len(modes)), [per[k]["step_ms"] for k in modes], 0.6, color="tab:gray")
        fm = m.get("forms")
        if fm and fm["rows"]["base"].get("graph_ms"):
            graph = {"base": fm["rows"]["base"]["graph_ms"], "dynamic": fm["rows"]["shipped"]["graph_ms"]}
            for k, v in graph.items():
                if k in modes:
                    ax.plot([modes.index(k)], [v], "o", color="tab:red",
                            label="CUDA graph (GPU time)" if k == "base" else None)
            ax.legend()
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels([k.replace(" (cache, in place)", "\n(cache)") for k in modes], rotation=20)
        ax.set_ylabel("ms per sampling step")
        ax.set_title(f"{m['label']}: per step, 1024x1024")
    fig.suptitle(f"{r['device']}, torch {r['torch']}, ComfyUI {r['comfyui']}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--md", default=str(HERE / "RESULTS.md"))
    p.add_argument("--png", default=str(HERE / "results.png"))
    p.add_argument("--notes", help="a Markdown file appended to RESULTS.md (targets, readings)")
    a = p.parse_args(argv)
    r = json.loads(Path(a.results).read_text())
    cmd = "python3 benchmarks/report.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    text = render(r, cmd)
    if a.notes:
        text += "\n" + Path(a.notes).read_text()
    Path(a.md).write_text(text)
    chart(r, Path(a.png))
    print(f"wrote {a.md} and {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
