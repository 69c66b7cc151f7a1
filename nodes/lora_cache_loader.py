"""The LoRA Cache nodes, declared with ComfyUI's V3 schema (comfy_api.latest, present since
0.3.75 and in current ComfyUI). They translate widget values into one call of lora_cache."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .. import lora_cache

_STRENGTH = dict(default=1.0, min=-100.0, max=100.0, step=0.01)
_MODE_TIP = ("auto: each adapted layer runs a merged copy of its weight (built once on the device, kept "
             "across runs) where memory holds one and it saves time, the rest unmerged in the layer's "
             "forward; the text encoder unmerged. merged: a merged copy wherever memory holds one (text "
             "encoder: ComfyUI's patch path). unmerged: always unmerged, no copies. ComfyUI's own weights "
             "are never changed; where the cache cannot serve, ComfyUI's patch path.")
_DESCRIPTION = ("Applies a LoRA like the stock LoRA loader, but keeps it cached on the model's device "
                "and applies it in the sampling's layers (merged copies of their weights, kept across "
                "runs, or unmerged in their forward), so toggling it, changing its strength or switching "
                "LoRAs between runs does not make ComfyUI reload or re-stream the model. Falls back to "
                "ComfyUI's patch path when it can't, and says why.")
STACK_ROWS = 4


def _lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def _check_names(*names) -> bool | str:
    """validate_inputs: 0.3.75 checks a V3 combo's value against its options only when the node
    validates it itself, so a missing file must be refused here to fail at POST /prompt."""
    known = set(_lora_names())
    for name in names:
        if name is not None and name != "None" and name not in known:
            return f"LoRA file '{name}' not found in the loras folders"
    return True


def _check_mode(mode) -> bool | str:
    """validate_inputs: a workflow saved with a former mode value (see lora_cache.MODE_ALIASES)
    must still run, so the node checks the mode itself instead of ComfyUI's list of options."""
    if lora_cache.mode_of(mode) is None:
        return f"unknown mode {mode!r} (one of {', '.join(lora_cache.MODES)})"
    return True


def _mode_input() -> io.Combo.Input:
    return io.Combo.Input("mode", options=list(lora_cache.MODES), default="auto", tooltip=_MODE_TIP)


def _loader_inputs(with_clip: bool) -> list:
    inputs = [io.Model.Input("model", tooltip="The diffusion model the LoRA will be applied to.")]
    if with_clip:
        inputs.append(io.Clip.Input("clip", tooltip="The CLIP model the LoRA will be applied to."))
    inputs += [
        io.Combo.Input("lora_name", options=_lora_names(), tooltip="The LoRA file, from the loras folders."),
        io.Float.Input("strength_model", **_STRENGTH,
                       tooltip="How strongly to modify the diffusion model. Can be negative."),
    ]
    if with_clip:
        inputs.append(io.Float.Input("strength_clip", **_STRENGTH,
                                     tooltip="How strongly to modify the CLIP model. Can be negative."))
    inputs += [
        io.Boolean.Input("enabled", default=True,
                         tooltip="Off: the outputs are the inputs. "
                                 "Turning a cached adapter back on costs microseconds."),
        _mode_input(),
    ]
    return inputs


class _OneLoRA(io.ComfyNode):
    """What both one-LoRA nodes share: the change fingerprint and the file name check."""

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, enabled=True, **_):
        return lora_cache.fingerprint(lora_name, enabled)

    @classmethod
    def validate_inputs(cls, lora_name=None, mode="auto"):
        ok = _check_names(lora_name)
        return _check_mode(mode) if ok is True else ok


class LoraCacheLoader(_OneLoRA):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraCacheLoader", display_name="LoRA Cache Loader", category="loaders",
            description=_DESCRIPTION, inputs=_loader_inputs(with_clip=True),
            outputs=[io.Model.Output(tooltip="The diffusion model with the LoRA."),
                     io.Clip.Output(tooltip="The CLIP model with the LoRA.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip, enabled=True, mode="auto") -> io.NodeOutput:
        m, c, _ = lora_cache.apply(model, clip, lora_name, strength_model, strength_clip, enabled, mode,
                                   cls.hidden.unique_id)
        return io.NodeOutput(m, c)


class LoraCacheLoaderModelOnly(_OneLoRA):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraCacheLoaderModelOnly", display_name="LoRA Cache Loader (Model Only)", category="loaders",
            description=_DESCRIPTION, inputs=_loader_inputs(with_clip=False),
            outputs=[io.Model.Output(tooltip="The diffusion model with the LoRA.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, lora_name, strength_model, enabled=True, mode="auto") -> io.NodeOutput:
        m, _, _ = lora_cache.apply(model, None, lora_name, strength_model, 0.0, enabled, mode, cls.hidden.unique_id)
        return io.NodeOutput(m)


class LoraCacheStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [io.Model.Input("model", tooltip="The diffusion model the LoRAs will be applied to."),
                  io.Clip.Input("clip", optional=True,
                                tooltip="Optional text encoder; the rows' strengths apply to it too.")]
        names = ["None"] + _lora_names()
        for i in range(1, STACK_ROWS + 1):
            inputs += [
                io.Combo.Input(f"lora_{i}", options=names, default="None",
                               tooltip=f"LoRA file of row {i} (None: row unused)."),
                io.Float.Input(f"strength_{i}", **_STRENGTH, tooltip=f"Strength of row {i}. Can be negative."),
                io.Boolean.Input(f"enabled_{i}", default=True,
                                 tooltip=f"Row {i} on/off; turning a cached row back on costs microseconds."),
            ]
        inputs.append(_mode_input())
        return io.Schema(
            node_id="LoraCacheStack", display_name="LoRA Cache Stack", category="loaders",
            description=("Several LoRAs in one node, each with its strength and an on/off switch: the same as "
                         "a chain of LoRA Cache Loaders. Rows set to None are skipped. Each row's strength "
                         "applies to the diffusion model and, when a CLIP is connected, to the text encoder."),
            inputs=inputs,
            outputs=[io.Model.Output(tooltip="The diffusion model with the LoRAs."),
                     io.Clip.Output(tooltip="The CLIP model with the LoRAs (None if none was connected).")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return tuple(lora_cache.fingerprint(kw.get(f"lora_{i}"), kw.get(f"enabled_{i}", True))
                     for i in range(1, STACK_ROWS + 1))

    @classmethod
    def validate_inputs(cls, lora_1=None, lora_2=None, lora_3=None, lora_4=None, mode="auto"):
        ok = _check_names(lora_1, lora_2, lora_3, lora_4)
        return _check_mode(mode) if ok is True else ok

    @classmethod
    def execute(cls, model, mode="auto", clip=None, **rows) -> io.NodeOutput:
        stack = [lora_cache.StackRow(rows[f"lora_{i}"], rows[f"strength_{i}"],
                                     rows[f"strength_{i}"] if clip is not None else 0.0, rows[f"enabled_{i}"])
                 for i in range(1, STACK_ROWS + 1) if f"lora_{i}" in rows]
        m, c, _ = lora_cache.apply_stack(model, clip, stack, mode, cls.hidden.unique_id)
        return io.NodeOutput(m, c)


NODES = [LoraCacheLoader, LoraCacheLoaderModelOnly, LoraCacheStack]

