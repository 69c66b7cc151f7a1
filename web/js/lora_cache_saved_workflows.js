// Workflows saved with a former value of the mode widget: "dynamic" named what is now the
// "unmerged" mode. The server still runs the old value; this shows it under its name when such a
// workflow is loaded, so the widget holds one of its options.
import { app } from "../../scripts/app.js";

const NODE_TYPES = new Set(["LoraCacheLoader", "LoraCacheLoaderModelOnly", "LoraCacheStack"]);
const MODE_ALIASES = { dynamic: "unmerged" };

app.registerExtension({
  name: "lora_cache.saved_workflows",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      const mode = this.widgets?.find((w) => w.name === "mode");
      if (mode && Object.hasOwn(MODE_ALIASES, mode.value)) mode.value = MODE_ALIASES[mode.value];
      return r;
    };
  },
});
