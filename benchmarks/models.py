"""SDXL- and Flux-shaped models from ComfyUI's own classes with random weights, and LoRA
files for them in names ComfyUI's key map accepts.

The weights are allocated where the model will run (`device`) and filled there: a 12B model
is never random-initialised on the host. `tiny` gives the same classes at a size the CPU
test suite runs in seconds.
"""
from __future__ import annotations

import math
from pathlib import Path

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import torch

from lora_cache_testkit import tiny_models

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The same classes at CPU-test size: 2 levels, 1 transformer block each.
SDXL_TINY = dict(SDXL_UNET, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1],
                 context_dim=128, adm_in_channels=2816)

FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2,
}
FLUX_TINY = dict(FLUX_DIT, vec_in_dim=32, context_in_dim=48, hidden_size=64, num_heads=2, depth=2,
                 depth_single_blocks=2, axes_dim=[8, 12, 12])


class Spec:
    """What the benchmark needs to know about one model shape."""

    def __init__(self, kind: str, tiny: bool, dtype: torch.dtype):
        self.kind = kind
        self.tiny = tiny
        self.dtype = dtype
        if kind == "sdxl":
            self.unet = dict(SDXL_TINY if tiny else SDXL_UNET)
            self.cfg = 1.0 if tiny else 7.0  # cfg > 1: ComfyUI batches cond and uncond (batch 2)
            self.latent = (1, 4, 8, 8) if tiny else (1, 4, 128, 128)
            self.context = (1, 8 if tiny else 77, self.unet["context_dim"])
        else:
            self.unet = dict(FLUX_TINY if tiny else FLUX_DIT)
            self.cfg = 1.0
            self.latent = (1, 16, 8, 8) if tiny else (1, 16, 128, 128)
            self.context = (1, 8 if tiny else 256, self.unet["context_in_dim"])
        self.cfg = 2.0 if tiny and kind == "sdxl" else self.cfg

    @property
    def label(self) -> str:
        return f"{'tiny ' if self.tiny else ''}{'SDXL' if self.kind == 'sdxl' else 'Flux'}"

    def conditioning(self, device_gen_seed: int = 5):
        g = torch.Generator().manual_seed(device_gen_seed)
        ctx = torch.randn(*self.context, generator=g)
        if self.kind == "sdxl":
            extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 1024, "height": 1024,
                     "target_width": 1024, "target_height": 1024}
        else:
            extra = {"pooled_output": torch.randn(1, self.unet["vec_in_dim"], generator=g), "guidance": 3.5}
        return [[ctx, extra]]


def build(spec: Spec, seed: int = 0):
    """A ModelPatcher over ComfyUI's SDXL / Flux model class, weights random on the load device."""
    load_device = mm.get_torch_device()
    if spec.kind == "sdxl":
        cfg = comfy.supported_models.SDXL(dict(spec.unet))
    else:
        cfg = comfy.supported_models.Flux(tiny_models.flux_config(spec.unet))
    cfg.set_inference_dtype(spec.dtype, None)
    # ComfyUI's ops skip parameter init: the weights are allocated, uninitialised, on load_device.
    model = cfg.get_model({}, "", device=load_device)
    randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device, mm.unet_offload_device())


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1:
            if "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        else:
            fan_in = p[0].numel()
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)


def block_linears(spec: Spec, model) -> list[str]:
    """Module paths of every Linear in the transformer blocks (SDXL: the SpatialTransformers,
    proj_in/proj_out included; Flux: the double and single blocks, modulation included)."""
    out = []
    for name, m in model.diffusion_model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if spec.kind == "sdxl":
            if ".transformer_blocks." in name or name.endswith(".proj_in") or name.endswith(".proj_out"):
                out.append("diffusion_model." + name)
        elif name.startswith("double_blocks.") or name.startswith("single_blocks."):
            out.append("diffusion_model." + name)
    return out


def _targets(spec: Spec, patcher) -> list[tuple[str, int, int]]:
    """(adapter key prefix, out rows, in columns) for every block Linear, in the names ComfyUI's key
    map accepts: SDXL in kohya naming (lora_unet_*); Flux in diffusers naming (transformer.*),
    whose to_q/to_k/to_v (and single blocks' proj_mlp) map onto the fused qkv / linear1 weights
    with offsets, so those prefixes cover a slice of the weight's rows."""
    model = patcher.model
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    by_weight: dict[str, list[tuple[str, object]]] = {}
    for name, target in key_map.items():
        key = target if isinstance(target, str) else target[0]
        by_weight.setdefault(key, []).append((name, target))
    out = []
    for path in block_linears(spec, model):
        key = path + ".weight"
        w = model.get_submodule(path).weight
        cands = by_weight.get(key, [])
        if spec.kind == "flux":
            names = [(n, t) for n, t in cands if n.startswith("transformer.")]
            split = [(n, t) for n, t in names if not isinstance(t, str) and t[1] is not None]
            chosen = split or names[:1] or [(path, key)]
        else:
            chosen = [(n, t) for n, t in cands if n == "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")]
        if not chosen:
            raise RuntimeError(f"no LoRA key in ComfyUI's key map for {key}")
        for name, target in chosen:
            out_dim = target[1][2] if not isinstance(target, str) and target[1] is not None else w.shape[0]
            out.append((name, out_dim, w.shape[1]))
    return out


def adapter_state_dict(spec: Spec, patcher, kind: str, rank: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """An adapter of `kind` on every block Linear: "lora" (rank `rank`), "loha" (two rank-`rank`
    Hadamard factors) or "lokr" (kron of a small full w1 with w2 = w2_a @ w2_b of rank `rank`, the
    dimensions split by ComfyUI's own factorization with factor 8, as LyCORIS' common presets do).
    Each is drawn so that its update has about the LoRA's magnitude, 0.3 / sqrt(in) per element."""
    from comfy.weight_adapter.base import factorization

    dev = patcher.load_device
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * std).to(spec.dtype).cpu()

    sd: dict[str, torch.Tensor] = {}
    for name, out_dim, in_dim in _targets(spec, patcher):
        target = 0.3 / math.sqrt(in_dim)  # the update's per-element magnitude
        if kind == "lora":
            down, up = rnd(rank, in_dim, std=1 / math.sqrt(in_dim)), rnd(out_dim, rank, std=0.3 / math.sqrt(rank))
            if spec.kind == "sdxl":
                sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
            else:
                sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
        elif kind == "loha":
            # each product (rank terms) about sqrt(target), so their Hadamard product about target
            std = (math.sqrt(target) / math.sqrt(rank)) ** 0.5
            for w in ("w1", "w2"):
                sd[f"{name}.hada_{w}_a"] = rnd(out_dim, rank, std=std)
                sd[f"{name}.hada_{w}_b"] = rnd(rank, in_dim, std=std)
        elif kind == "lokr":
            a, c = factorization(out_dim, 8)
            b, d = factorization(in_dim, 8)
            sd[name + ".lokr_w1"] = rnd(a, b, std=1.0)
            std = (target / math.sqrt(rank)) ** 0.5
            sd[name + ".lokr_w2_a"] = rnd(c, rank, std=std)
            sd[name + ".lokr_w2_b"] = rnd(rank, d, std=std)
        else:
            raise ValueError(kind)
        sd[name + ".alpha"] = torch.tensor(float(rank))
    return sd


def write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
