"""The LoRA Cache Sweep node: image i of the latent batch gets the i-th setting."""
from __future__ import annotations

from comfy_api.latest import io

from .. import lora_cache
from ..lora_cache import sweep_service
from .lora_cache_loader import _check_names, _lora_names

ROWS = 4


class LoraCacheSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = ["None"] + _lora_names()
        inputs = [io.Model.Input("model", tooltip="The diffusion model the sweep runs on."),
                  io.Clip.Input("clip", optional=True,
                                tooltip="Optional text encoder: gets the LoRA at strength_clip for every image "
                                        "when one LoRA is swept (one text encoding serves the whole batch).")]
        for i in range(1, ROWS + 1):
            inputs.append(io.Combo.Input(f"lora_{i}", options=names, default="None",
                                         tooltip=f"LoRA {i} of the sweep (None: unused). Several LoRAs at one "
                                                 f"strength compare them; several strengths make a grid."))
        inputs += [
            io.String.Input("strengths", default="0, 0.5, 0.8, 1.0",
                            tooltip="The strengths, separated by commas; each LoRA gets each strength, one image "
                                    "per pair (LoRA-major). Can be negative."),
            io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                           tooltip="One text encoder strength for every image, with a single LoRA; with several "
                                   "LoRAs the text encoder stays unchanged."),
        ]
        return io.Schema(
            node_id="LoraCacheSweep", display_name="LoRA Cache Sweep", category="loaders",
            description=("A strength sweep, a LoRA comparison or a grid of both in one batched sampling: image i of "
                         "the latent batch gets setting i, applied per image in the layers' forward (unmerged; a "
                         "merged weight cannot differ per image). Feed batch_size to the Empty Latent Image; a "
                         "latent with another batch size is an error at sampling. Stacks with LoRA Cache Loaders, "
                         "which apply to every image."),
            inputs=inputs,
            outputs=[io.Model.Output(tooltip="The diffusion model: image i of the batch gets setting i."),
                     io.Clip.Output(tooltip="The text encoder (None if none was connected)."),
                     io.Int.Output(display_name="batch_size", tooltip="The number of settings: the latent's batch."),
                     io.String.Output(display_name="labels", tooltip="Each image's setting, one a line.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return tuple(lora_cache.fingerprint(kw.get(f"lora_{i}"), True) for i in range(1, ROWS + 1))

    @classmethod
    def validate_inputs(cls, lora_1=None, lora_2=None, lora_3=None, lora_4=None):
        return _check_names(lora_1, lora_2, lora_3, lora_4)

    @classmethod
    def execute(cls, model, strengths, strength_clip=1.0, clip=None, **loras) -> io.NodeOutput:
        names = [loras.get(f"lora_{i}", "None") for i in range(1, ROWS + 1)]
        r = sweep_service.apply_sweep(model, clip, names, strengths, strength_clip, cls.hidden.unique_id)
        return io.NodeOutput(r.model, r.clip, r.batch_size, "\n".join(r.labels))
