// A "LoRA Cache" sidebar tab: the cached adapters from GET /lora_cache/stats (name, bytes,
// device, how it is applied), per device the bytes of factors, their budget and the merged
// copies held, and a Purge button calling POST /lora_cache/purge. It refreshes when opened,
// after each LoRA Cache event while it is open, and on its Refresh button. Frontends without
// sidebar tabs get the same panel in a floating dialog opened from a small button.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "lora-cache";

function formatBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return String(n ?? "-");
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(e.style, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// Per device: the bytes of factors on it and its budget, as the server's memory owner reports
// them in stats.memory.device: {"cuda:0": {"bytes": ..., "limit": ..., "source": "..."}}.
function deviceRows(stats) {
  return Object.entries(stats.memory?.device ?? {});
}

class Panel {
  constructor(root) {
    this.root = root;
    this.status = el("div", { "data-lora-cache": "status", style: { opacity: 0.8, margin: "4px 0" } });
    this.body = el("div", { "data-lora-cache": "body" });
    const btn = (label, onclick, role) => el("button", {
      "data-lora-cache": role, onclick,
      style: { padding: "4px 10px", cursor: "pointer", background: "var(--comfy-input-bg)", color: "var(--fg-color)",
               border: "1px solid var(--border-color)", borderRadius: "4px" },
    }, label);
    root.replaceChildren(el("div", { "data-lora-cache": "panel", style: { padding: "8px", fontSize: "12px", color: "var(--fg-color)" } },
      el("h3", { style: { margin: "0 0 8px 0" } }, "LoRA Cache"),
      el("div", { style: { display: "flex", gap: "6px" } },
        btn("Refresh", () => this.refresh(), "refresh"),
        btn("Purge", () => this.purge(), "purge")),
      this.status, this.body));
  }

  async refresh() {
    try {
      const res = await api.fetchApi("/lora_cache/stats");
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      this.render(await res.json());
    } catch (e) {
      this.status.textContent = `Could not read /lora_cache/stats: ${e.message ?? e}`;
    }
  }

  async purge() {
    try {
      const res = await api.fetchApi("/lora_cache/purge", { method: "POST" });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const { purged } = await res.json();
      await this.refresh();
      this.status.textContent = `Purged ${purged} adapter${purged === 1 ? "" : "s"}.`;
    } catch (e) {
      this.status.textContent = `Purge failed: ${e.message ?? e}`;
    }
  }

  render(stats) {
    const adapters = stats.adapters ?? [];
    this.status.textContent = adapters.length
      ? `${adapters.length} cached adapter${adapters.length === 1 ? "" : "s"}`
      : "No cached adapters.";
    const cell = { padding: "2px 4px", borderBottom: "1px solid var(--border-color)", textAlign: "left", whiteSpace: "nowrap" };
    const table = el("table", { "data-lora-cache": "adapters", style: { width: "100%", borderCollapse: "collapse" } },
      el("tr", {}, ...["name", "bytes", "device", "applied"].map((h) => el("th", { style: cell }, h))));
    for (const a of adapters) {
      const how = a.cached === false ? `full: ${a.reason ?? ""}` : "cache";
      table.append(el("tr", { "data-lora-cache": "adapter", "data-name": a.name },
        el("td", { style: cell }, a.name),
        el("td", { style: cell, title: `${a.bytes} bytes` }, formatBytes(a.bytes)),
        el("td", { style: cell }, a.device ?? "-"),
        el("td", { style: cell, title: a.layers != null ? `${a.layers} layers` : "" }, how)));
    }
    const devices = el("table", { "data-lora-cache": "devices", style: { width: "100%", borderCollapse: "collapse", marginTop: "10px" } },
      el("tr", {}, ...["device", "cached", "budget", "merged copies"].map((h) => el("th", { style: cell }, h))));
    for (const [dev, row] of deviceRows(stats)) {
      const copies = stats.memory?.copies?.[dev] ?? { bytes: 0, layers: 0 };
      devices.append(el("tr", { "data-lora-cache": "device", "data-device": dev },
        el("td", { style: cell }, dev),
        el("td", { style: cell, title: `${row.bytes} bytes` }, formatBytes(row.bytes)),
        el("td", { style: cell, title: row.source, "data-lora-cache": "budget" }, formatBytes(row.limit)),
        el("td", { style: cell, title: `${copies.layers} layers`, "data-lora-cache": "copies" },
          formatBytes(copies.bytes))));
    }
    this.body.replaceChildren(table, devices);
  }
}

let panel = null;

function openDialog() {
  let box = document.getElementById("lora-cache-dialog");
  if (box) { box.remove(); panel = null; return; }
  box = el("div", { id: "lora-cache-dialog", style: {
    position: "fixed", right: "16px", top: "60px", width: "360px", maxHeight: "70vh", overflow: "auto",
    background: "var(--comfy-menu-bg)", border: "1px solid var(--border-color)", borderRadius: "6px", zIndex: 1000 } });
  document.body.append(box);
  panel = new Panel(box);
  panel.refresh();
}

app.registerExtension({
  name: "lora_cache.panel",
  setup() {
    api.addEventListener("lora_cache.event", () => {
      if (panel?.root.isConnected) panel.refresh();
    });
    const sidebar = app.extensionManager?.registerSidebarTab;
    if (typeof sidebar === "function") {
      app.extensionManager.registerSidebarTab({
        id: TAB_ID,
        icon: "pi pi-database",
        title: "LoRA Cache",
        tooltip: "LoRA Cache: cached adapters and memory",
        type: "custom",
        render: (root) => {
          panel = new Panel(root);
          panel.refresh();
        },
        destroy: () => { panel = null; },
      });
    } else {
      document.body.append(el("button", { id: "lora-cache-open", onclick: openDialog, style: {
        position: "fixed", right: "16px", bottom: "16px", zIndex: 1000 } }, "LoRA Cache"));
    }
  },
});
