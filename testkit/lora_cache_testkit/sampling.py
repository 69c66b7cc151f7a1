"""Sampling the tiny SD-type model outside a prompt, as the GPU checks do: comfy.sample with
fixed noise and random conditioning, and the stock LoRA path to compare with."""
from __future__ import annotations

from pathlib import Path

import comfy.model_management as mm
import comfy.sample
import comfy.sd
import comfy.utils
import torch

from .scratch import scratch_dir


def tiny_fp16_model_from_file(prefix: str, loras: dict[str, int]):
    """The tiny SD-type UNet in fp16 loaded through ComfyUI's loader from a file under dynamic
    VRAM (comfy-aimdo maps its weights from the file), and rank-4 LoRA files on its attention and
    feed-forward layers (name -> seed, written as name.safetensors) in a new loras folder:
    (base, the folder)."""
    import folder_paths
    from safetensors.torch import save_file

    from . import aimdo, tiny_models
    tmp = scratch_dir(prefix)
    folder_paths.add_model_folder_path("loras", str(tmp), is_default=True)
    unet_sd16 = {k: v.half() for k, v in tiny_models.sd_unet_state_dict(seed=0).items()}
    ref_sd = {k: v.float() for k, v in unet_sd16.items()}
    for name, seed in loras.items():
        tiny_models.write_lora(tmp / f"{name}.safetensors", tiny_models.sd_lora_state_dict(ref_sd, seed=seed))
    # written before dynamic VRAM is on, loaded from the file after: weights mapped from it
    save_file(unet_sd16, str(tmp / "unet.safetensors"))
    aimdo.use_dynamic(True)
    return comfy.sd.load_diffusion_model(str(tmp / "unet.safetensors")), tmp


def tiny_fp16_model_and_lora(name: str = "a.safetensors"):
    """The tiny SD-type UNet in fp16 (a ModelPatcher) and a rank-4 LoRA on its attention,
    feed-forward and resnet convolutions, written as `name` into a new loras folder: (base, the
    LoRA file's path)."""
    import folder_paths

    from . import tiny_models
    tmp = scratch_dir("lc_sampling_")
    folder_paths.add_model_folder_path("loras", str(tmp), is_default=True)
    unet_sd16 = {k: v.half() for k, v in tiny_models.sd_unet_state_dict(seed=0).items()}
    lora_sd = tiny_models.sd_lora_state_dict({k: v.float() for k, v in unet_sd16.items()}, seed=1,
                                              kinds=("attn", "ff", "conv"))
    tiny_models.write_lora(tmp / name, lora_sd)
    return comfy.sd.load_diffusion_model_state_dict(dict(unet_sd16)), tmp / name


def tiny_sd_sampler(steps: int = 4, seed: int = 42, size: int = 16):
    """sample(model) -> the float latent of `steps` euler steps on a size x size latent, cfg 1.5."""
    g = torch.Generator().manual_seed(3)
    cond = [[torch.randn(1, 77, 1024, generator=g), {}]]
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)

    def sample(model) -> torch.Tensor:
        return comfy.sample.sample(model, noise, steps, 1.5, "euler", "normal", cond, cond, latent,
                                   seed=seed).float()

    return sample


def stock_lora(base, path: Path, strength: float = 1.0):
    """What the stock LoraLoaderModelOnly makes of `base` and the LoRA file at `path`."""
    return comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(str(path)), strength, 0)[0]


def apply_under_vram_state(lc, base, sample, lora_path: Path, state: str) -> dict:
    """One apply of the LoRA at `lora_path` (lora_cache.apply, as the node calls it) and a sample
    while ComfyUI's vram_state is `state` (LOW_VRAM, NO_VRAM: what --lowvram / --novram set): the
    path taken, why, and the output's largest difference to the stock loader's sampled in the
    same state (ComfyUI's patch path there: equal) and in the normal state (ComfyUI's lowvram
    patches round differently from its merged weights)."""
    old = mm.vram_state
    normal = sample(stock_lora(base, lora_path))
    mm.vram_state = getattr(mm.VRAMState, state)
    try:
        stock = sample(stock_lora(base, lora_path))
        m, _, ev = lc.apply(base, None, lora_path.name, 1.0, 0.0, True, "auto")
        out = sample(m)
    finally:
        mm.vram_state = old
    return {"path": ev.path, "reason": ev.reason, "max_abs_diff_vs_stock": float((out - stock).abs().max()),
            "stock_vs_stock_normal_state": float((stock - normal).abs().max())}
