// Draws the last LoRA Cache event (path, reason, time) on each LoRA Cache Loader node.
// The node sends "lora_cache.event" through PromptServer.send_sync on every execution, so a
// re-run always replaces the badge; a node that ComfyUI served from its cache is marked so.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["LoraCacheLoader", "LoraCacheLoaderModelOnly"]);
const COLORS = { fast: "#2e7d32", build: "#1565c0", full: "#ef6c00", off: "#616161" };

function badgeText(ev) {
  return `${ev.path} · ${ev.ms.toFixed(ev.ms < 10 ? 2 : 0)} ms · ${ev.reason}`;
}

app.registerExtension({
  name: "lora_cache.badge",
  setup() {
    api.addEventListener("lora_cache.event", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
      if (!node) return;
      node.loraCacheEvent = detail;
      node.loraCacheStale = false;
      node.setDirtyCanvas(true, true);
    });
    api.addEventListener("execution_cached", ({ detail }) => {
      for (const id of detail.nodes ?? []) {
        const node = app.graph?.getNodeById(Number(id));
        if (node?.loraCacheEvent) {
          node.loraCacheStale = true;
          node.setDirtyCanvas(true, true);
        }
      }
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const ev = this.loraCacheEvent;
      if (!ev || this.flags?.collapsed) return;
      const text = (this.loraCacheStale ? "cached output · " : "") + badgeText(ev);
      ctx.save();
      ctx.font = "11px sans-serif";
      const w = Math.min(this.size[0], ctx.measureText(text).width + 12);
      ctx.fillStyle = COLORS[ev.path] ?? "#444";
      ctx.beginPath();
      ctx.roundRect?.(0, this.size[1] + 4, w, 18, 4);
      ctx.fill();
      ctx.fillStyle = "#fff";
      ctx.fillText(text, 6, this.size[1] + 17, this.size[0] - 12);
      ctx.restore();
    };
  },
});
