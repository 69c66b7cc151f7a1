// Draws the last LoRA Cache event (path, reason, time) under each LoRA Cache node.
// The node sends "lora_cache.event" through PromptServer.send_sync on every execution, so a
// re-run always replaces the badge. When ComfyUI serves the node from its own output cache the
// node does not execute and sends nothing; "execution_cached" names it, and the badge says so
// instead of passing off the previous run's event as this one's.
// A stack node sends one summary event with its rows: each row is drawn, one a line.
// When a sampling that runs the node's adapters starts, "lora_cache.sampling" says what it runs
// (merged copies, unmerged layers, what was built): one more line under the node's event.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["LoraCacheLoader", "LoraCacheLoaderModelOnly", "LoraCacheStack"]);
const COLORS = { fast: "#2e7d32", build: "#1565c0", full: "#ef6c00", off: "#616161", sampling: "#4a148c" };
const LINE_H = 18;

let currentPrompt = null;

function findNode(id) {
  if (id === undefined || id === null || !app.graph) return null;
  return app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id) ?? null;
}

function formatMs(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "? ms";
  return `${ms.toFixed(ms < 10 ? 2 : 0)} ms`;
}

function eventText(ev, withName) {
  const name = withName && ev.lora ? `${ev.lora}: ` : "";
  return `${name}${ev.path} · ${formatMs(ev.ms)} · ${ev.reason}`;
}

function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

function badgeLines(node) {
  const events = node.loraCacheEvents ?? [];
  const many = events.length > 1;
  const lines = events.map((ev) => ({ text: eventText(ev, many), path: ev.path }));
  if (node.loraCacheStale && lines.length) {
    lines[0] = { ...lines[0], text: "cached output, not re-run · last: " + lines[0].text };
  }
  const sampling = node.loraCacheSampling;
  if (sampling && lines.length) {
    lines.push({ text: `sampling · ${sampling.reason}`, path: "sampling" });
  }
  return lines;
}

function onEvent({ detail }) {
  const node = findNode(detail?.node);
  if (!node) return;
  if (Array.isArray(detail.rows)) {
    // A LoRA Cache Stack sends one summary event carrying each row's event: one line a row.
    node.loraCacheEvents = detail.rows.length ? detail.rows.slice() : [detail];
    node.loraCachePrompt = currentPrompt;
  } else {
    // A new prompt starts a new list; within one prompt a node may report more than once.
    if (node.loraCachePrompt !== currentPrompt || !node.loraCacheEvents) {
      node.loraCacheEvents = [];
      node.loraCachePrompt = currentPrompt;
      node.loraCacheSampling = null;
    }
    const same = node.loraCacheEvents.findIndex((e) => e.lora === detail.lora);
    if (same >= 0) node.loraCacheEvents.splice(same, 1, detail);
    else node.loraCacheEvents.push(detail);
  }
  node.loraCacheEvent = detail;
  node.loraCacheStale = false;
  node.setDirtyCanvas(true, true);
}

function onSampling({ detail }) {
  // Stack rows are named "<node>:<row>"; the line goes under the node.
  const ids = new Set((detail?.nodes ?? []).map((id) => String(id).split(":")[0]));
  for (const id of ids) {
    const node = findNode(id);
    if (!node) continue;
    node.loraCacheSampling = detail;
    node.setDirtyCanvas(true, true);
  }
}

function onCached({ detail }) {
  for (const id of detail?.nodes ?? []) {
    const node = findNode(id);
    if (node?.loraCacheEvents?.length) {
      node.loraCacheStale = true;
      node.setDirtyCanvas(true, true);
    }
  }
}

app.registerExtension({
  name: "lora_cache.badge",
  setup() {
    api.addEventListener("execution_start", ({ detail }) => {
      currentPrompt = detail?.prompt_id ?? null;
    });
    api.addEventListener("lora_cache.event", onEvent);
    api.addEventListener("lora_cache.sampling", onSampling);
    api.addEventListener("execution_cached", onCached);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      const lines = badgeLines(this);
      if (!lines.length) return;
      ctx.save();
      ctx.font = "11px sans-serif";
      const maxW = Math.max(this.size[0], 320);
      let y = this.size[1] + 4;
      const drawn = [];
      for (const line of lines) {
        const text = fit(ctx, line.text, maxW - 12);
        const w = ctx.measureText(text).width + 12;
        ctx.fillStyle = this.loraCacheStale ? "#555" : COLORS[line.path] ?? "#444";
        ctx.beginPath();
        if (ctx.roundRect) ctx.roundRect(0, y, w, LINE_H - 2, 4);
        else ctx.rect(0, y, w, LINE_H - 2);
        ctx.fill();
        ctx.fillStyle = "#fff";
        ctx.fillText(text, 6, y + 12);
        drawn.push(line.text);
        y += LINE_H;
      }
      ctx.restore();
      // What was last drawn, for the browser test and for debugging from the console.
      this.loraCacheBadgeText = drawn.join("\n");
      this.loraCacheBadgeDraws = (this.loraCacheBadgeDraws ?? 0) + 1;
    };
  },
});
