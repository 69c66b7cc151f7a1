"""Reading a LoRA file and turning it into ComfyUI patches and, where possible, cached forms.

Everything goes through ComfyUI's own machinery (load_torch_file, convert_lora, the key
maps, load_lora and its weight adapter classes), so every file and naming the stock
LoraLoader accepts is accepted here. Which form each adapter type takes: adapter_forms.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import torch

from . import key_map as key_maps
from .adapter_forms import BuildContext, Built, NoForm, Target, forms_for
from .errors import LoraCacheError
from .files import FileIdentity
from .low_rank import share_down


class Patches(dict):
    """target -> adapter, as returned by comfy.lora.load_lora, with `sources`: target -> the
    file's key prefix it came from (for messages)."""

    sources: dict

    def __init__(self, patches: dict, sources: dict | None = None):
        super().__init__(patches)
        self.sources = sources or {}


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


def split_patches(sd: dict, model_patcher, clip, lora_name: str = "LoRA") -> tuple[Patches, Patches]:
    """The file's patches for the diffusion model and for the text encoder, as stock makes them:
    one key map over both, one load_lora, so naming rules and warnings match stock."""
    unet_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {}) if model_patcher is not None else {}
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    key_map = key_maps.for_file({**unet_map, **clip_map}, sd)
    try:
        loaded = comfy.lora.load_lora(sd, key_map)
    except KeyError as e:  # an adapter class found its first key and looked for a missing partner
        missing = e.args[0] if e.args else "?"
        raise LoraCacheError(f"LoRA file '{lora_name}' is malformed: key '{missing}' is missing "
                             f"(ComfyUI's LoRA loader needs it next to the keys of the same layer)") from e
    except Exception as e:
        raise LoraCacheError(f"LoRA file '{lora_name}' could not be read by ComfyUI's LoRA loader: "
                             f"{type(e).__name__}: {e}") from e
    sources = _sources(sd, key_map, loaded)
    unet_targets = set(unet_map.values())
    unet = Patches({k: v for k, v in loaded.items() if k in unet_targets}, sources)
    clip_p = Patches({k: v for k, v in loaded.items() if k not in unet_targets}, sources)
    return unet, clip_p


def _sources(sd: dict, key_map: dict, loaded: dict) -> dict:
    prefixes = {k.split(".", 1)[0] for k in sd} | {k.rsplit(".", 2)[0] for k in sd if k.count(".") >= 2}
    out = {}
    for prefix, target in key_map.items():
        if target in loaded and prefix in prefixes:
            out[target] = prefix
    return out


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
class CachedForms:
    """What the cached path would install: module path -> forms, or why it can't.
    `form_note`: which form the adapter types other than plain LoRA took, for the build reason."""

    layers: dict[str, tuple] | None
    reason: str | None  # set when the adapter must take the full path
    form_note: str | None = None


def _counted(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} on {n} layer{'s' if n != 1 else ''}" for k, n in sorted(kinds.items()))


def unsupported(patches: dict) -> str | None:
    """Patches that are not weight adapters (ComfyUI's "diff" / "set" tuples)."""
    kinds: dict[str, int] = {}
    for adapter in patches.values():
        if not isinstance(adapter, comfy.weight_adapter.WeightAdapterBase):
            kind = describe_adapter(adapter)
            kinds[kind] = kinds.get(kind, 0) + 1
    if kinds:
        return f"{_counted(kinds)}: no cached form (only ComfyUI's weight adapters have one)"
    return None


def resolve(target, adapter, model, sources: dict) -> Target:
    """The layer a patch targets; NoForm where it is not a Linear or plain convolution weight."""
    key = target_key(target)
    offset = target[1] if not isinstance(target, str) and len(target) > 1 else None
    function = target[2] if not isinstance(target, str) and len(target) > 2 else None
    if not key.endswith(".weight"):
        raise NoForm(f"patch on '{key}' (not a layer weight)")
    path = key[: -len(".weight")]
    try:
        module = comfy.utils.get_attr(model, path)
    except AttributeError:
        raise NoForm(f"'{path}' is not a module") from None
    if offset is not None and offset[0] != 0:
        raise NoForm(f"'{key}' is patched along dim {offset[0]}")
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        if module.groups != 1 or module.transposed or module.padding_mode != "zeros":
            raise NoForm(f"'{path}' is a grouped, transposed or padded-mode convolution")
        if offset is not None or function is not None:
            raise NoForm(f"'{key}' is a partial or transformed convolution patch")
    elif not isinstance(module, torch.nn.Linear):
        raise NoForm(f"'{path}' is a {type(module).__name__}, not a Linear or convolution")
    return Target(key, module, offset, function, sources.get(target, key), adapter)


def module_path(t: Target) -> str:
    return t.key[: -len(".weight")]


def cached_forms(patches: dict, model_patcher, lora_name: str, device, dtype, progress=None) -> CachedForms:
    """Forms for the cached path. Raises on shapes that cannot belong to the layer.
    `patches`: target -> adapter, a Patches (its `sources` name the file's keys in messages) or
    ComfyUI's load_lora result as it is.
    `progress(done)` is called every few layers: a large adapter's build shows in the UI."""
    reason = unsupported(patches)
    if reason is not None:
        return CachedForms(None, reason)
    ctx = BuildContext(lora_name, device, dtype)
    sources = getattr(patches, "sources", {})
    per_module: dict[str, list] = {}
    hows: dict[str, int] = {}
    try:
        targets = [resolve(target, adapter, model_patcher.model, sources) for target, adapter in patches.items()]
        for i, t in enumerate(targets):
            if progress is not None and i % 32 == 0:
                progress(i)
            built: Built = forms_for(ctx, t)
            per_module.setdefault(module_path(t), []).extend(built.forms)
            if built.how != "lora":
                hows[built.how] = hows.get(built.how, 0) + 1
    except NoForm as e:
        return CachedForms(None, e.reason)
    if progress is not None:
        progress(len(patches))
    forms = {k: tuple(v) for k, v in per_module.items()}
    for fs in forms.values():
        share_down(fs)  # at build time, so the layer's factors move and count as one set
    return CachedForms(forms, None, _counted(hows) if hows else None)


