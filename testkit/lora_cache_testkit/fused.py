"""A layer computed the way newer ComfyUI's `comfy.ops.linear_input_act` computes an MLP's
down-projection under fp16 accumulation (fp16 activations, CUDA): the weight and bias from
`comfy.ops.cast_bias_weight`, the product by a kernel of its own (comfy-kitchen's `fp16_linear`;
here `F.linear`), the layer's forward never called. Used on the tiny SD UNet's feed-forwards."""
from __future__ import annotations

import functools

import comfy.ops
import torch
import torch.nn.functional as F

# The tiny UNet's first feed-forward, and its down-projection as the cache names the layer.
FF = "input_blocks.1.1.transformer_blocks.0.ff"
DOWN = f"diffusion_model.{FF}.net.2"
# The down-projection's prefix in a kohya-named LoRA file (tiny_models.sd_lora_state_dict).
DOWN_KEY = "lora_unet_" + f"{FF}.net.2".replace(".", "_")


def _feed_forward(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    project_in, dropout, down = ff.net
    h = dropout(project_in(x))
    weight, bias, stream = comfy.ops.cast_bias_weight(down, h, offloadable=True)
    try:
        return F.linear(h, weight, bias)
    finally:
        comfy.ops.uncast_bias_weight(down, weight, bias, stream)


def _own_cast_forward(self, input):
    weight, bias, stream = comfy.ops.cast_bias_weight(self, input, offloadable=True)
    try:
        return F.linear(input, weight, bias)
    finally:
        comfy.ops.uncast_bias_weight(self, weight, bias, stream)


def fuse(diffusion_model: torch.nn.Module, path: str = FF, own_cast: bool = False) -> torch.nn.Module:
    """Makes the feed-forward at `path` compute its down-projection without calling that layer's
    forward; returns the layer. `own_cast` gives the layer an ops class with a cast of its own
    (as scaled-fp8 ops have), which the adapter cannot ride."""
    ff = diffusion_model.get_submodule(path)
    ff.__dict__["forward"] = functools.partial(_feed_forward, ff)
    down = ff.net[2]
    if own_cast and not type(down).__name__.startswith("OwnCast"):
        down.__class__ = type("OwnCast" + type(down).__name__, (type(down),),
                              {"forward_comfy_cast_weights": _own_cast_forward})
    return down


def without_layer(lora_sd: dict[str, torch.Tensor], key: str = DOWN_KEY) -> dict[str, torch.Tensor]:
    """`lora_sd` without the factors of the layer `key` (what a net that missed it would serve)."""
    return {k: v for k, v in lora_sd.items() if not k.startswith(key + ".")}
