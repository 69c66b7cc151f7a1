"""The LoRA Cache Loader nodes: translate widget values into one call of lora_cache.apply."""
from __future__ import annotations

import folder_paths

from .. import lora_cache

_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
_MODE_TIP = ("auto: dynamic (unmerged, cached) when the adapter and the model allow it, else "
             "ComfyUI's patch path. dynamic: the same, named explicitly. merged: always ComfyUI's "
             "patch path (weights merged on the load device).")


def _common_inputs() -> dict:
    return {
        "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The LoRA file, from the loras folders."}),
        "strength_model": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly to modify the diffusion model. Can be negative."}),
    }


def _tail_inputs() -> dict:
    return {
        "enabled": ("BOOLEAN", {"default": True, "tooltip": "Off: the outputs are the inputs. Turning a cached adapter back on costs microseconds."}),
        "mode": (list(lora_cache.MODES), {"default": "auto", "tooltip": _MODE_TIP}),
    }


class LoraCacheLoader:
    DESCRIPTION = ("Applies a LoRA like the stock LoRA loader, but keeps its factors cached on the "
                   "model's device and applies them in the layers' forward, so toggling it between "
                   "runs does not make ComfyUI reload the model. Falls back to ComfyUI's patch path "
                   "when it can't, and says why.")
    CATEGORY = "loaders"
    FUNCTION = "load_lora"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA.", "The CLIP model with the LoRA.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
                "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
                **_common_inputs(),
                "strength_clip": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly to modify the CLIP model. Can be negative."}),
                **_tail_inputs(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, lora_name=None, enabled=True, **_):
        return lora_cache.fingerprint(lora_name, enabled)

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip, enabled=True, mode="auto", unique_id=None):
        m, c, _ = lora_cache.apply(model, clip, lora_name, strength_model, strength_clip, enabled, mode, unique_id)
        return (m, c)


class LoraCacheLoaderModelOnly(LoraCacheLoader):
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA.",)
    FUNCTION = "load_lora_model_only"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
                **_common_inputs(),
                **_tail_inputs(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def load_lora_model_only(self, model, lora_name, strength_model, enabled=True, mode="auto", unique_id=None):
        m, _, _ = lora_cache.apply(model, None, lora_name, strength_model, 0.0, enabled, mode, unique_id)
        return (m,)


STACK_ROWS = 4


class LoraCacheStack:
    DESCRIPTION = ("Several LoRAs in one node, each with its strength and an on/off switch: the same as "
                   "a chain of LoRA Cache Loaders. Rows set to None are skipped. Each row's strength "
                   "applies to the diffusion model and, when a CLIP is connected, to the text encoder.")
    CATEGORY = "loaders"
    FUNCTION = "load_stack"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRAs.", "The CLIP model with the LoRAs (None if none was connected).")

    @classmethod
    def INPUT_TYPES(cls):
        names = ["None"] + folder_paths.get_filename_list("loras")
        required = {"model": ("MODEL", {"tooltip": "The diffusion model the LoRAs will be applied to."})}
        for i in range(1, STACK_ROWS + 1):
            required[f"lora_{i}"] = (names, {"default": "None", "tooltip": f"LoRA file of row {i} (None: row unused)."})
            required[f"strength_{i}"] = ("FLOAT", {**_STRENGTH, "tooltip": f"Strength of row {i}. Can be negative."})
            required[f"enabled_{i}"] = ("BOOLEAN", {"default": True, "tooltip": f"Row {i} on/off; turning a cached row back on costs microseconds."})
        required["mode"] = (list(lora_cache.MODES), {"default": "auto", "tooltip": _MODE_TIP})
        return {"required": required,
                "optional": {"clip": ("CLIP", {"tooltip": "Optional text encoder; the rows' strengths apply to it too."})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return tuple(lora_cache.fingerprint(kw.get(f"lora_{i}"), kw.get(f"enabled_{i}", True))
                     for i in range(1, STACK_ROWS + 1))

    def load_stack(self, model, mode="auto", clip=None, unique_id=None, **rows):
        stack = [lora_cache.StackRow(rows[f"lora_{i}"], rows[f"strength_{i}"],
                                     rows[f"strength_{i}"] if clip is not None else 0.0, rows[f"enabled_{i}"])
                 for i in range(1, STACK_ROWS + 1) if f"lora_{i}" in rows]
        m, c, _ = lora_cache.apply_stack(model, clip, stack, mode, unique_id)
        return (m, c)


NODE_CLASS_MAPPINGS = {
    "LoraCacheLoader": LoraCacheLoader,
    "LoraCacheLoaderModelOnly": LoraCacheLoaderModelOnly,
    "LoraCacheStack": LoraCacheStack,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraCacheLoader": "LoRA Cache Loader",
    "LoraCacheLoaderModelOnly": "LoRA Cache Loader (Model Only)",
    "LoraCacheStack": "LoRA Cache Stack",
}
