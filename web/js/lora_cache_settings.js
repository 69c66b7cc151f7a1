// The LoRA Cache memory budget as a ComfyUI setting (Settings dialog, "LoRA Cache").
// The server reads it from the user's comfy.settings.json (lora_cache/budget.py); the
// LORA_CACHE_GPU_BUDGET_MB environment variable, when set, takes precedence.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "lora_cache.settings",
  settings: [
    {
      id: "LoraCache.GpuBudgetMB",
      category: ["LoRA Cache", "Memory", "GPU budget"],
      name: "GPU memory for cached LoRA factors (MB, 0 = automatic: 10% of the GPU)",
      tooltip:
        "Least recently used LoRAs beyond this move to CPU memory and come back when used again; " +
        "LoRAs used by the running prompt are never moved.",
      type: "number",
      defaultValue: 0,
      attrs: { min: 0, step: 64 },
    },
  ],
});
