"""Reading a LoRA file and turning it into ComfyUI patches and, where possible, factors.

Everything goes through ComfyUI's own machinery (load_torch_file, convert_lora, the key
maps, load_lora), so every file and naming the stock LoraLoader accepts is accepted here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter

from .errors import LoraCacheError
from .files import FileIdentity
from .layers import LayerFactors, share_down

Patches = dict  # target -> adapter, as returned by comfy.lora.load_lora


def read_file(identity: FileIdentity, lora_name: str) -> dict[str, torch.Tensor]:
    try:
        sd = comfy.utils.load_torch_file(identity.path, safe_load=True)
    except Exception as e:  # safetensors and torch.load raise many types; all mean "unreadable"
        if "Weights only load failed" in str(e):  # torch's own text suggests an unsafe load: not ours
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            raise LoraCacheError(
                f"LoRA file '{lora_name}' could not be loaded: it holds pickled Python objects"
                f"{f' ({m.group(1)})' if m else ''} that ComfyUI's safe loading refuses (code in a "
                f"pickle is never run); use a safetensors file") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraCacheError(
            f"LoRA file '{lora_name}' could not be loaded (truncated, corrupt, or not a "
            f"safetensors/torch file): {first}") from e
    if not isinstance(sd, dict) or not sd:
        raise LoraCacheError(f"LoRA file '{lora_name}' holds no tensors")
    return comfy.lora_convert.convert_lora(sd)


def check_strength(lora_name: str, **strengths: float) -> None:
    for name, value in strengths.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LoraCacheError(f"LoRA '{lora_name}': {name} must be a finite number, got {value!r}")


def target_key(target) -> str:
    return target if isinstance(target, str) else target[0]


def split_patches(sd: dict, model_patcher, clip) -> tuple[Patches, Patches]:
    """The file's patches for the diffusion model and for the text encoder, as stock makes them:
    one key map over both, one load_lora, so naming rules and warnings match stock."""
    unet_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {}) if model_patcher is not None else {}
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    loaded = comfy.lora.load_lora(sd, {**unet_map, **clip_map})
    unet_targets = set(unet_map.values())
    unet = {k: v for k, v in loaded.items() if k in unet_targets}
    clip_p = {k: v for k, v in loaded.items() if k not in unet_targets}
    return unet, clip_p


def describe_adapter(adapter) -> str:
    if isinstance(adapter, comfy.weight_adapter.WeightAdapterBase):
        name = getattr(adapter, "name", type(adapter).__name__)
        if name == "lora":
            w = adapter.weights
            if w[4] is not None:
                return "dora"
            if w[5] is not None:
                return "lora with reshape"
        return name
    if isinstance(adapter, tuple) and adapter and isinstance(adapter[0], str):
        return adapter[0]
    return type(adapter).__name__


@dataclass
class Plan:
    """What the dynamic path would install: module path -> factors, or why it can't."""

    layers: dict[str, tuple[LayerFactors, ...]] | None
    reason: str | None  # set when the adapter must take the full path


def _row_linear(function, up: torch.Tensor) -> bool:
    # A patch function (e.g. Flux's swap_scale_shift) is moved onto `up` only if it commutes:
    # function(up @ R) == function(up) @ R for a random R.
    probe = torch.randn(up.shape[1], 3, dtype=torch.float32)
    u = up.float().reshape(up.shape[0], -1)
    try:
        return torch.allclose(function(u @ probe), function(u) @ probe, rtol=1e-4, atol=1e-5)
    except Exception:
        return False


def plan_dynamic(patches: Patches, model_patcher, lora_name: str, device, dtype, progress=None) -> Plan:
    """Factors for the dynamic path. Raises on shapes that cannot belong to the layer.
    `progress(done)` is called every few layers: a large adapter's build shows in the UI."""
    kinds: dict[str, int] = {}
    for target, adapter in patches.items():
        kind = describe_adapter(adapter)
        if kind != "lora":
            kinds[kind] = kinds.get(kind, 0) + 1
    if kinds:
        found = ", ".join(f"{k} on {n} layer{'s' if n != 1 else ''}" for k, n in sorted(kinds.items()))
        return Plan(None, f"{found}: only plain low-rank LoRA takes the dynamic path")

    model = model_patcher.model
    per_module: dict[str, list[LayerFactors]] = {}
    for i, (target, adapter) in enumerate(patches.items()):
        if progress is not None and i % 32 == 0:
            progress(i)
        key = target_key(target)
        offset = target[1] if not isinstance(target, str) and len(target) > 1 else None
        function = target[2] if not isinstance(target, str) and len(target) > 2 else None
        if not key.endswith(".weight"):
            return Plan(None, f"patch on '{key}' (not a layer weight)")
        path = key[: -len(".weight")]
        try:
            module = comfy.utils.get_attr(model, path)
        except AttributeError:
            return Plan(None, f"'{path}' is not a module")
        up, down, alpha, mid = adapter.weights[0], adapter.weights[1], adapter.weights[2], adapter.weights[3]
        rank = down.shape[0]
        scale = (alpha / rank) if alpha is not None else 1.0
        if offset is not None and offset[0] != 0:
            return Plan(None, f"'{key}' is patched along dim {offset[0]}")
        out_len = offset[2] if offset is not None else None

        if isinstance(module, torch.nn.Linear):
            # Some trainers store Linear factors as 1x1 conv kernels; stock flattens them.
            if up.ndim > 2 and all(d == 1 for d in up.shape[2:]):
                up = up.flatten(1)
            if down.ndim > 2 and all(d == 1 for d in down.shape[2:]):
                down = down.flatten(1)
            out_dim = out_len if out_len is not None else module.out_features
            if mid is not None or up.ndim != 2 or down.ndim != 2 or up.shape[1] != rank:
                raise LoraCacheError(f"LoRA file '{lora_name}': '{key}' has factors {tuple(up.shape)} x "
                                     f"{tuple(down.shape)}, not a low-rank pair for a Linear layer")
            if up.shape[0] != out_dim or down.shape[1] != module.in_features:
                raise LoraCacheError(
                    f"LoRA file '{lora_name}': '{key}' expects a {out_dim}x{module.in_features} weight but "
                    f"the factors make {up.shape[0]}x{down.shape[1]} (a LoRA for another model?)")
            if rank > min(out_dim, module.in_features):
                raise LoraCacheError(
                    f"LoRA file '{lora_name}': '{key}' has rank {rank}, more than the layer's "
                    f"{out_dim}x{module.in_features} weight can use (not a low-rank adapter)")
            if function is not None:
                if not _row_linear(function, up):
                    return Plan(None, f"patch function on '{key}' does not commute with the factors")
                up = function(up.float())
            f = LayerFactors("linear", down.t().to(device, dtype).contiguous(),
                             up.t().to(device, dtype).contiguous(), scale,
                             out_slice=(offset[1], offset[2]) if offset is not None else None)
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            if module.groups != 1 or module.transposed or module.padding_mode != "zeros":
                return Plan(None, f"'{path}' is a grouped, transposed or padded-mode convolution")
            if offset is not None or function is not None:
                return Plan(None, f"'{key}' is a partial or transformed convolution patch")
            nd = len(module.kernel_size)
            kernel = tuple(module.kernel_size)
            ok = (up.ndim == nd + 2 and down.ndim == nd + 2 and up.shape[0] == module.out_channels
                  and up.shape[1] == rank and tuple(up.shape[2:]) == (1,) * nd
                  and down.shape[1] == module.in_channels)
            if ok and mid is None:
                ok = tuple(down.shape[2:]) == kernel
            elif ok:
                ok = (tuple(down.shape[2:]) == (1,) * nd and mid.ndim == nd + 2
                      and tuple(mid.shape[2:]) == kernel and mid.shape[1] == rank)
            if not ok:
                raise LoraCacheError(
                    f"LoRA file '{lora_name}': '{key}' factors {tuple(up.shape)} x {tuple(down.shape)} "
                    f"do not fit the {type(module).__name__} {module.out_channels}x{module.in_channels}x{kernel}")
            if rank > min(module.out_channels, module.in_channels * math.prod(kernel)):
                raise LoraCacheError(
                    f"LoRA file '{lora_name}': '{key}' has rank {rank}, more than the "
                    f"{type(module).__name__} {module.out_channels}x{module.in_channels}x{kernel} can use")
            f = LayerFactors("conv", down.to(device, dtype).contiguous(), up.to(device, dtype).contiguous(), scale,
                             mid=None if mid is None else mid.to(device, dtype).contiguous())
        else:
            return Plan(None, f"'{path}' is a {type(module).__name__}, not a Linear or convolution")
        per_module.setdefault(path, []).append(f)
    if progress is not None:
        progress(len(patches))
    planned = {k: tuple(v) for k, v in per_module.items()}
    for fs in planned.values():
        share_down(fs)  # at build time, so the layer's factors move and count as one set
    return Plan(planned, None)
