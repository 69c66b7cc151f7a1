"""Tables and a chart from bench_dynamic.py's results (the 8-event series in interleaved rounds).

    python3 benchmarks/report_dynamic.py benchmarks/data/h200-copies/*.json \
        --chart benchmarks/results-dynamic.png > tables.md

Prints, per model and configuration: events 2-8 of each loader per round and their median, the
ceiling (7 x the median base image) and each loader over it, each event's median image over the
base image, the modules streamed, the node call, our merged-copy choice and the checks; the chart
draws the medians of events 2-8 beside the ceiling.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

LABELS = {"stock": "stock LoraLoaderModelOnly", "bypass": "LoraLoaderBypassModelOnly",
          "ours": "LoRA Cache Loader (auto)", "ours-unmerged": "LoRA Cache Loader (mode unmerged)",
          "ours-output": "LoRA Cache Loader (auto), streamed weights' update in the output"}
CONFIGS = {"dynamic": "dynamic VRAM, whole card", "dynamic@14": "dynamic VRAM, 14 GiB free",
           "classic": "classic patcher"}
ADAPTERS = {"loha": "LoHa", "lokr": "LoKr"}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(res: dict, loaders: list[str], events: int) -> dict:
    """Medians over the rounds of one configuration: the base image, the ceiling (7 x base), and
    per loader events 2-8 per round, their median, over the ceiling, each event over base, the
    most node ms and modules streamed, stock over the loader. Also for a run stopped at its time
    limit (the rounds it finished)."""
    rounds = res["rounds"]
    base_med = median([rnd["base"]["s"] for rnd in rounds])
    summary: dict = {"base_image_s": base_med, "ceiling_s": 7 * base_med}
    for loader in loaders:
        rows = [rnd["loaders"][loader] for rnd in rounds]
        per_round = [sum(r["event_s"] for r in rws[1:]) for rws in rows]
        summary[loader] = {
            "events_2_8_s": per_round, "median_s": median(per_round),
            "over_ceiling": median(per_round) / (7 * base_med),
            "per_event_over_base": [median([rws[i]["event_s"] for rws in rows]) / base_med for i in range(events)],
            "node_ms_max": max(r["node_ms"] for rws in rows for r in rws[1:]),
            "streamed_modules_max": max(r["streamed_modules"] for rws in rows for r in rws[1:])}
    for loader in loaders:
        if loader != "stock" and "stock" in summary:
            summary[loader]["vs_stock"] = summary["stock"]["median_s"] / summary[loader]["median_s"]
    return summary


def _summary(r: dict, res: dict) -> dict:
    return res.get("summary") or summarize(res, r["loaders"], len(r["events"]))


def _title(r: dict, config: str, res: dict) -> str:
    kind = "" if r.get("adapter", "lora") == "lora" else f" {ADAPTERS[r['adapter']]} (rank {r['rank']})"
    host = f"ComfyUI {r['comfyui']}" + (f", comfy-aimdo {r['aimdo_version']}"
                                         if config.startswith("dynamic") and r.get("aimdo_version") else "")
    if r.get("device", "cpu") != "cpu":  # runs before the benchmark recorded it ran torch's native one
        host += f", {r.get('allocator') or 'native'} allocator"
    started = f", run {r['started'][:16]}" if r.get("started") else ""
    return (f"{r['model']}{kind}, {CONFIGS.get(config, config)} ({host}, {res['patcher']}, {r['steps']} steps, "
            f"{len(res['rounds'])} rounds{started})")


def tables(results: list[dict]) -> str:
    out = []
    for r in results:
        for config, res in r["configs"].items():
            s = _summary(r, res)
            out.append(f"#### {_title(r, config, res)}\n")
            out.append(f"Base image (median) {s['base_image_s']:.2f} s; ceiling (7 x base) "
                       f"**{s['ceiling_s']:.1f} s**.\n")
            out.append("| loader | events 2-8 per round, s | median s | over the ceiling | stock / loader |"
                       " node ms (events 2-8, most) | modules streamed (events 2-8, most) |")
            out.append("|---|---|---|---|---|---|---|")
            for loader in r["loaders"]:
                x = s[loader]
                vs = f"{x['vs_stock']:.2f}x" if "vs_stock" in x else ""
                out.append(f"| {LABELS.get(loader, loader)} | {', '.join(f'{v:.1f}' for v in x['events_2_8_s'])} | "
                           f"**{x['median_s']:.1f}** | {x['over_ceiling']:.2f} | {vs} | {x['node_ms_max']:.1f} | "
                           f"{x['streamed_modules_max']} |")
            out.append("\nEach event's image over the base image (medians over rounds):\n")
            out.append("| loader | " + " | ".join(r["events"]) + " |")
            out.append("|---" * (len(r["events"]) + 1) + "|")
            for loader in r["loaders"]:
                out.append(f"| {LABELS.get(loader, loader)} | "
                           + " | ".join(f"{v:.2f}" for v in s[loader]["per_event_over_base"]) + " |")
            ours = [rnd["loaders"]["ours"] for rnd in res["rounds"] if "ours" in rnd["loaders"]]
            if ours:
                fast = [e["node_ms"] for rows in ours for e in rows if e.get("path") == "fast"]
                built = [e for rows in ours for e in rows[1:] if e.get("built")]
                out.append(f"\nOurs: node call on a fast event {min(fast):.2f}-{max(fast):.2f} ms; "
                           f"{ours[0][0]['sampling']}.")
                if built:
                    ms = [e["build_ms"] for e in built]
                    out.append(f"Copies built again by a strength change or switch: {min(ms):.0f}-{max(ms):.0f} ms "
                               f"(median {statistics.median(ms):.0f} ms).")
            p = res.get("parity", {})
            if p and "stock" in r["loaders"]:  # a run without stock recorded 0 for what it did not compare
                bypass = f", bypass {p['max_abs_bypass_vs_stock']:.3g}" if "bypass" in r["loaders"] else ""
                out.append(f"Max |latent - stock|: ours {p['max_abs_ours_vs_stock']:.3g}{bypass}.")
            out.append("")
        if r["checks"] or r.get("finished"):
            out.append("Checks: " + "; ".join(f"{'ok' if c['ok'] else 'FAILED'}: {c['check']} ({c['detail']})"
                                              for c in r["checks"]) + "\n")
        else:
            out.append("Checks: none, the run stopped at its time limit before them.\n")
    return "\n".join(out)


def chart_groups(results: list[dict]) -> list[tuple[str, dict]]:
    """The chart's bars: per configuration the newest run beside stock (the tables keep the others)."""
    newest: dict[str, tuple[tuple[bool, str], dict, dict]] = {}
    for r in results:
        for c, res in r["configs"].items():
            label = (f"{r['model']}{'' if r.get('adapter', 'lora') == 'lora' else ' ' + ADAPTERS[r['adapter']]}\n"
                     f"{CONFIGS.get(c, c)}\nComfyUI {r['comfyui']}")
            rank = ("stock" in r["loaders"], r.get("started", ""))
            if label not in newest or rank > newest[label][0]:
                newest[label] = (rank, r, res)
    return [(label, _summary(r, res)) for label, (_, r, res) in sorted(newest.items())]


def chart(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = chart_groups(results)
    bars = ["ceiling", "stock", "bypass", "ours"]
    fig, ax = plt.subplots(figsize=(2.4 * len(groups) + 2, 4))
    width = 0.8 / len(bars)
    for i, bar in enumerate(bars):
        xs = [g + (i - 1.5) * width for g in range(len(groups))]
        ys = [s["ceiling_s"] if bar == "ceiling" else s[bar]["median_s"] if bar in s else 0 for _, s in groups]
        ax.bar(xs, ys, width, label="ceiling: 7 x base image" if bar == "ceiling" else LABELS[bar],
               color="#bbbbbb" if bar == "ceiling" else None)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.set_ylabel("events 2-8, median seconds (lower is better)")
    ax.set_title(f"8-event LoRA series, {results[0]['device']}: the newest run of each configuration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--chart")
    a = p.parse_args()
    results = [json.loads(Path(f).read_text()) for f in a.results]
    series = [r for r in results if _kind(r) == "series"]
    print(tables(series))
    print(sweep_tables([r for r in results if _kind(r) == "sweep"]))
    if a.chart:
        chart(series, Path(a.chart))


def _kind(r: dict) -> str | None:
    """"series" (the 8-event series), "sweep" (--sweep rounds), or None (another JSON: a GPU check)."""
    rounds = [rnd for res in r.get("configs", {}).values() for rnd in res.get("rounds", [])]
    if not rounds:
        return None
    return "series" if "loaders" in rounds[0] else "sweep" if "sweep" in rounds[0] else None


def _seconds(v: float) -> str:
    return "-" if v != v else f"{v:.2f} s"  # nan: not measured in that run


def sweep_tables(results: list[dict]) -> str:
    """Per model and configuration: the sweep as one batched sampling against the same strengths as
    separate runs of stock and of ours, medians over rounds."""
    if not results:
        return ""
    out = ["| model, configuration | rounds | strengths | base image | base batch | stock's runs | ours' runs |"
           " the sweep | stock / sweep | ours / sweep |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for config, res in r["configs"].items():
            rounds = res["rounds"]
            med = {k: median([rnd[k]["s"] for rnd in rounds if k in rnd])
                   for k in ("base", "base_batch", "stock", "ours", "sweep")}
            out.append(f"| {r['model']}, {CONFIGS.get(config, config)} | {len(rounds)} | "
                       f"{', '.join(f'{x:g}' for x in res['strengths'])} | {med['base']:.2f} s | "
                       f"{_seconds(med['base_batch'])} | {med['stock']:.2f} s | {med['ours']:.2f} s | "
                       f"**{med['sweep']:.2f} s** | "
                       f"{med['stock'] / med['sweep']:.2f}x | {med['ours'] / med['sweep']:.2f}x |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
