"""The LoRA Cache Grid node: a sweep's images in one picture, each setting under its image."""
from __future__ import annotations

from comfy_api.latest import io

from ..lora_cache import grid


class LoraCacheGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraCacheGrid", display_name="LoRA Cache Grid", category="image",
            description="Puts an IMAGE batch into one picture with each image's label (e.g. a sweep's setting) "
                        "written under it.",
            inputs=[io.Image.Input("images", tooltip="The decoded batch, e.g. of a LoRA Cache Sweep's sampling."),
                    io.String.Input("labels", multiline=True, force_input=True,
                                    tooltip="One label a line, one per image (the sweep's labels output)."),
                    io.Int.Input("columns", default=0, min=0, max=64,
                                 tooltip="Images per row; 0: one row up to 8 images, else about square.")],
            outputs=[io.Image.Output(tooltip="The labelled grid as one image.")])

    @classmethod
    def execute(cls, images, labels, columns=0) -> io.NodeOutput:
        return io.NodeOutput(grid.labelled_grid(images, grid.split_labels(labels), columns))
