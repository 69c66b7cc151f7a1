"""Tables and a chart from bench_dynamic.py's results (the 8-event series on current ComfyUI).

    python3 benchmarks/report_dynamic.py benchmarks/data/h200-dynamic/dynamic-*.json \
        --chart benchmarks/results-dynamic.png > tables.md

Prints, per model and configuration, events 2-8 of each loader, each event's seconds, the weight
bytes streamed, the node's time and the checks; the chart draws events 2-8 side by side.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"stock": "stock LoraLoaderModelOnly", "bypass": "LoraLoaderBypassModelOnly",
          "ours": "LoRA Cache Loader (auto)",
          "ours-output": "LoRA Cache Loader, weight form off (updates added into the output)",
          "ours-patch": "LoRA Cache Loader, merged mode (ComfyUI's patch path)"}
CONFIGS = {"dynamic": "dynamic VRAM, whole card", "dynamic@14": "dynamic VRAM, 14 GiB free",
           "classic": "classic patcher"}


ADAPTERS = {"loha": "LoHa", "lokr": "LoKr"}


def tables(results: list[dict]) -> str:
    out = []
    for r in results:
        for config, res in r["configs"].items():
            events = r["events"]
            kind = "" if r.get("adapter", "lora") == "lora" else f" {ADAPTERS[r['adapter']]} (rank {r['rank']})"
            where = CONFIGS.get(config, config)
            out.append(f"#### {r['model']}{kind}, {where} ({res['patcher']}, {r['steps']} steps)\n")
            out.append("| loader | base image s | " + " | ".join(events) + " | events 2-8 s |")
            out.append("|---" * (len(events) + 3) + "|")
            for loader, d in res["loaders"].items():
                cells = [f"{e['event_s']:.2f}" for e in d["events"]]
                out.append(f"| {LABELS.get(loader, loader)} | {d['base_s'][0]:.2f} | " + " | ".join(cells)
                           + f" | **{d['events_2_8_s']:.1f}** |")
            stock = res["loaders"].get("stock", {}).get("events_2_8_s")
            ours = res["loaders"].get("ours", {}).get("events_2_8_s")
            if stock and ours:
                out.append(f"\nEvents 2-8, stock / ours: **{stock / ours:.2f}x**.")
            streamed = {loader: max(e["streamed_bytes"] for e in d["events"][1:]) / 2**30
                        for loader, d in res["loaders"].items()}
            base = {loader: d["base_streamed_bytes"][0] / 2**30 for loader, d in res["loaders"].items()}
            per_loader = ", ".join(f"{loader} {base[loader]:.1f} / {streamed[loader]:.1f}" for loader in streamed)
            out.append(f"Weights streamed per image, GiB (base image / most in events 2-8): {per_loader}.")
            node = [e["node_ms"] for e in res["loaders"]["ours"]["events"] if e.get("path") == "fast"]
            if node:
                out.append(f"Our node on a fast event: {min(node):.1f}-{max(node):.1f} ms.")
            p = res.get("parity", {})
            if p:
                out.append(f"Max |latent - stock|: ours {p['max_abs_ours_vs_stock']:.3g}, bypass "
                           f"{p['max_abs_bypass_vs_stock']:.3g}.")
            out.append("")
        out.append("Checks: " + "; ".join(f"{'ok' if c['ok'] else 'FAILED'}: {c['check']} ({c['detail']})"
                                          for c in r["checks"]) + "\n")
    return "\n".join(out)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(f"{r['model']}\n{CONFIGS.get(c, c)}", res) for r in results for c, res in r["configs"].items()]
    loaders = ["stock", "bypass", "ours"]
    fig, ax = plt.subplots(figsize=(2.4 * len(groups) + 2, 4))
    width = 0.8 / len(loaders)
    for i, loader in enumerate(loaders):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        ys = [res["loaders"][loader]["events_2_8_s"] if loader in res["loaders"] else 0 for _, res in groups]
        ax.bar(xs, ys, width, label=LABELS[loader])
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.set_ylabel("events 2-8, seconds (lower is better)")
    ax.set_title(f"8-event LoRA series, ComfyUI {results[0]['comfyui']}, {results[0]['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--chart")
    a = p.parse_args()
    results = [json.loads(Path(f).read_text()) for f in a.results]
    print(tables(results))
    if a.chart:
        chart(results, Path(a.chart))


if __name__ == "__main__":
    main()
