"""Tiny models with random weights and LoRA files for them, built from ComfyUI's own classes.

SD-type: an SD2.0 UNet small enough for CPU (ComfyUI's model detection recognises it).
Flux-type: ComfyUI's Flux class with a tiny config (detection fixes Flux's width at 3072,
so the config is passed directly). LoRA files use the names ComfyUI's key maps accept:
`lora_unet_*` for the UNet and diffusers `transformer.*.to_q` etc. for Flux, which ComfyUI
maps onto the fused qkv weight with offsets.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SD_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=-2, context_dim=1024, num_head_channels=64,
    use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
    num_heads=-1,
)

FLUX_CONFIG = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48,
    hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
    axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2,
)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale") or "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def sd_unet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SD_UNET_CONFIG, operations=comfy.ops.manual_cast, device="cpu")
    # The tiny model has no middle block: ComfyUI's detection reads that from the keys.
    _randomize(unet, seed)
    return {k: v.contiguous() for k, v in unet.state_dict().items()}


def write_sd_unet(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in sd_unet_state_dict(seed).items()}, str(path))
    return path


def flux_config(config: dict | None = None) -> dict:
    """A Flux config (default: FLUX_CONFIG) as this host's Flux class takes it."""
    import comfy.ldm.flux.model

    config = dict(FLUX_CONFIG if config is None else config)
    if "txt_ids_dims" in getattr(comfy.ldm.flux.model.FluxParams, "__dataclass_fields__", {}):
        config["txt_ids_dims"] = []  # newer ComfyUI: what its own detection sets for classic Flux
    return config


def flux_patcher(seed: int = 0):
    """A ModelPatcher over ComfyUI's own Flux model class with a tiny config."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.Flux(flux_config())
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=mm.unet_offload_device())
    _randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def lora_factors(out_dim: int, in_dim: int, rank: int, g: torch.Generator, scale: float = 0.2):
    up = scale * torch.randn(out_dim, rank, generator=g)
    down = scale * torch.randn(rank, in_dim, generator=g)
    return up, down


def sd_lora_state_dict(unet_sd: dict[str, torch.Tensor], rank: int = 4, seed: int = 1,
                       alpha: float | None = 2.0, kinds: tuple[str, ...] = ("attn", "ff")) -> dict[str, torch.Tensor]:
    """A LoRA in kohya naming (lora_unet_*) on the attention and feed-forward Linears."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, w in unet_sd.items():
        if not k.endswith(".weight"):
            continue
        is_attn = w.ndim == 2 and (".attn1." in k or ".attn2." in k)
        is_ff = w.ndim == 2 and ".ff." in k
        is_conv = w.ndim == 4 and ".in_layers." in k  # LoCon on the resnet 3x3 convs
        if not ((is_attn and "attn" in kinds) or (is_ff and "ff" in kinds) or (is_conv and "conv" in kinds)):
            continue
        base = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        if is_conv:
            g_up = scale_conv = 0.05
            up = g_up * torch.randn(w.shape[0], rank, 1, 1, generator=g)
            down = scale_conv * torch.randn(rank, w.shape[1], w.shape[2], w.shape[3], generator=g)
        else:
            up, down = lora_factors(w.shape[0], w.shape[1], rank, g)
        out[base + ".lora_up.weight"] = up.half()
        out[base + ".lora_down.weight"] = down.half()
        if alpha is not None:
            out[base + ".alpha"] = torch.tensor(float(alpha))
    return out


def flux_lora_state_dict(rank: int = 4, seed: int = 2) -> dict[str, torch.Tensor]:
    """A Flux LoRA in diffusers naming: separate to_q/to_k/to_v that ComfyUI maps onto the
    fused img_attn.qkv weight with offsets, plus single-block and MLP projections."""
    g = torch.Generator().manual_seed(seed)
    h = FLUX_CONFIG["hidden_size"]
    mlp = int(h * FLUX_CONFIG["mlp_ratio"])
    out: dict[str, torch.Tensor] = {}

    def add(name: str, o: int, i: int):
        up, down = lora_factors(o, i, rank, g)
        out[f"transformer.{name}.lora_A.weight"] = down
        out[f"transformer.{name}.lora_B.weight"] = up

    for b in range(FLUX_CONFIG["depth"]):
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            add(f"transformer_blocks.{b}.attn.{p}", h, h)
        add(f"transformer_blocks.{b}.attn.to_out.0", h, h)
        add(f"transformer_blocks.{b}.ff.net.0.proj", mlp, h)
        add(f"transformer_blocks.{b}.ff.net.2", h, mlp)
    for b in range(FLUX_CONFIG["depth_single_blocks"]):
        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
            add(f"single_transformer_blocks.{b}.{p}", mlp if p == "proj_mlp" else h, h)
        add(f"single_transformer_blocks.{b}.proj_out", h, h + mlp)
    return out


def write_lora(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    tmp.replace(path)
    return path


def write_taesd(vae_approx_dir: Path, seed: int = 3) -> Path:
    """A TAESD-shaped VAE with random weights, as the two files the stock VAELoader lists as
    "taesd" (models/vae_approx/taesd_encoder.* and taesd_decoder.*), so SaveImage gets pixels."""
    from comfy.taesd.taesd import Decoder, Encoder

    vae_approx_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {"taesd_encoder": Encoder(), "taesd_decoder": Decoder()}
        # ComfyUI's ops skip weight init; fan-in scaled weights keep activations finite and
        # the decoded pixels spread out, so different latents give visibly different images.
        with torch.no_grad():
            for module in parts.values():
                for p in module.parameters():
                    if p.ndim > 1:
                        p.copy_(torch.randn(p.shape) * (1.0 / p[0].numel()) ** 0.5)
                    else:
                        p.zero_()
    for name, module in parts.items():
        write_lora(vae_approx_dir / f"{name}.safetensors", module.state_dict())
    return vae_approx_dir


# -- every weight adapter type ComfyUI loads ---------------------------------------------------
#
# Files of each type for the tiny models, with the weight names the adapter classes in
# comfy.weight_adapter look for (`load()`), under key prefixes ComfyUI's key maps accept.

ADAPTER_KINDS = ("lora", "loha", "lokr", "glora", "oft", "boft")


def sd_targets(unet_sd: dict[str, torch.Tensor], kinds: tuple[str, ...] = ("attn", "ff")) -> dict[str, tuple]:
    """kohya prefixes (lora_unet_*) -> the layer weight's shape, for the SD UNet's attention and
    feed-forward Linears and (with "conv") its resnet 3x3 convolutions."""
    out = {}
    for k, w in unet_sd.items():
        if not k.endswith(".weight"):
            continue
        is_attn = w.ndim == 2 and (".attn1." in k or ".attn2." in k)
        is_ff = w.ndim == 2 and ".ff." in k
        is_conv = w.ndim == 4 and ".in_layers." in k
        if (is_attn and "attn" in kinds) or (is_ff and "ff" in kinds) or (is_conv and "conv" in kinds):
            out["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = tuple(w.shape)
    return out


def flux_targets() -> dict[str, tuple]:
    """Diffusers prefixes -> shapes for the tiny Flux: separate q/k/v that ComfyUI maps onto the
    fused qkv / linear1 weights with offsets, and whole Linears."""
    h = FLUX_CONFIG["hidden_size"]
    mlp = int(h * FLUX_CONFIG["mlp_ratio"])
    out = {}
    for b in range(FLUX_CONFIG["depth"]):
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"):
            out[f"transformer.transformer_blocks.{b}.attn.{p}"] = (h, h)
        out[f"transformer.transformer_blocks.{b}.ff.net.0.proj"] = (mlp, h)
        out[f"transformer.transformer_blocks.{b}.ff.net.2"] = (h, mlp)
    for b in range(FLUX_CONFIG["depth_single_blocks"]):
        for p in ("attn.to_q", "attn.to_k", "attn.to_v"):
            out[f"transformer.single_transformer_blocks.{b}.{p}"] = (h, h)
        out[f"transformer.single_transformer_blocks.{b}.proj_mlp"] = (mlp, h)
        out[f"transformer.single_transformer_blocks.{b}.proj_out"] = (h, h + mlp)
    return out


def _factor(dim: int, factor: int) -> tuple[int, int]:
    from comfy.weight_adapter.base import factorization
    return factorization(dim, factor)


def adapter_tensors(kind: str, prefix: str, shape: tuple, g: torch.Generator, rank: int = 4,
                    dora: str | None = None, variant: str | None = None) -> dict[str, torch.Tensor]:
    """One layer's tensors of adapter `kind` for a weight of `shape` (out, in, *kernel).

    variant: loha "tucker" (conv: hada_t1/t2 cores); lokr "full" (lokr_w2 given whole) or
    "tucker" (conv: lokr_t2); glora "old" (LyCORIS' Linear layout); oft "constrained" (an alpha
    that scales the rotation down); dora "out" / "in": a magnitude per output row / input column."""
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    k = 1
    for d in kernel:
        k *= d
    r = rank
    t: dict[str, torch.Tensor] = {}

    def rnd(*s, scale=0.2):
        return scale * torch.randn(*s, generator=g)

    if kind == "lora":
        if kernel:
            t["lora_up.weight"] = rnd(out_dim, r, *([1] * len(kernel)), scale=0.1)
            t["lora_down.weight"] = rnd(r, in_dim, *kernel, scale=0.1)
        else:
            t["lora_up.weight"], t["lora_down.weight"] = rnd(out_dim, r), rnd(r, in_dim)
        t["alpha"] = torch.tensor(float(r) / 2)
    elif kind == "loha":
        if variant == "tucker":  # conv only: w1a [R, out], w1b [R, in], t1 [R, R, *kernel]
            t.update({"hada_w1_a": rnd(r, out_dim, scale=0.3), "hada_w1_b": rnd(r, in_dim, scale=0.3),
                      "hada_w2_a": rnd(r, out_dim, scale=0.3), "hada_w2_b": rnd(r, in_dim, scale=0.3),
                      "hada_t1": rnd(r, r, *kernel, scale=0.3), "hada_t2": rnd(r, r, *kernel, scale=0.3)})
        else:
            t.update({"hada_w1_a": rnd(out_dim, r, scale=0.3), "hada_w1_b": rnd(r, in_dim * k, scale=0.3),
                      "hada_w2_a": rnd(out_dim, r, scale=0.3), "hada_w2_b": rnd(r, in_dim * k, scale=0.3)})
        t["alpha"] = torch.tensor(float(r))
    elif kind == "lokr":
        a, c = _factor(out_dim, 4)
        b, d = _factor(in_dim, 4)
        t["lokr_w1"] = rnd(a, b, scale=0.5)
        if variant == "full":
            t["lokr_w2"] = rnd(c, d, *kernel, scale=0.05)
        elif variant == "tucker":
            t.update({"lokr_w2_a": rnd(r, c), "lokr_w2_b": rnd(r, d), "lokr_t2": rnd(r, r, *kernel)})
        else:
            t.update({"lokr_w2_a": rnd(c, r), "lokr_w2_b": rnd(r, d * k)})
        t["alpha"] = torch.tensor(float(r))
    elif kind == "glora":
        if variant == "old":  # LyCORIS' nn.Linear layout: a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]
            t.update({"a1.weight": rnd(r, in_dim, scale=0.1), "a2.weight": rnd(in_dim, r, scale=0.1),
                      "b1.weight": rnd(r, in_dim, scale=0.1), "b2.weight": rnd(out_dim, r, scale=0.1)})
        else:  # a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in * kernel]
            ones = [1] * len(kernel)
            t.update({"a1.weight": rnd(in_dim, r, *ones, scale=0.1), "a2.weight": rnd(r, in_dim, *ones, scale=0.1),
                      "b1.weight": rnd(out_dim, r, *ones, scale=0.1), "b2.weight": rnd(r, in_dim, *kernel, scale=0.1)})
        t["alpha"] = torch.tensor(float(r))
    elif kind == "oft":
        n = 8
        t["oft_blocks"] = rnd(out_dim // n, n, n, scale=0.05)
        t["alpha"] = torch.tensor(0.1 if variant == "constrained" else 0.0)
    elif kind == "boft":
        n, stages = 8, 2
        t["oft_blocks"] = rnd(stages, out_dim // n, n, n, scale=0.05)
        t["rescale"] = 1.0 + rnd(out_dim, *([1] * (len(kernel) + 1)), scale=0.05)
        t["alpha"] = torch.tensor(0.0)
    else:
        raise ValueError(kind)
    if dora == "out":
        t["dora_scale"] = (0.05 * (in_dim * k) ** 0.5) * (1.0 + rnd(out_dim, *([1] * (len(kernel) + 1)), scale=0.1))
    elif dora == "in":
        t["dora_scale"] = (0.05 * (out_dim * k) ** 0.5) * (1.0 + rnd(1, in_dim, *([1] * len(kernel)), scale=0.1))
    return {f"{prefix}.{name}": v for name, v in t.items()}


def adapter_state_dict(kind: str, targets: dict[str, tuple], seed: int = 1, **kw) -> dict[str, torch.Tensor]:
    """A file of adapter `kind` on every target (prefix -> weight shape); see adapter_tensors."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, shape in targets.items():
        out.update(adapter_tensors(kind, prefix, shape, g, **kw))
    return out
