"""ComfyUI's key map narrowed to the entries a file has keys under (lora_cache.key_map):
comfy.lora.load_lora returns the same patches, in the same order and holding the same tensors,
from the narrowed map as from ComfyUI's whole map, for every adapter type, naming and extra key
(alpha, dora_scale, diff, diff_b, set_weight) the suite writes, on the diffusion model and the
text encoder; where a ComfyUI loader would ask for keys that do not start with the entry, the
whole map is used."""
from __future__ import annotations

import comfy.lora
import comfy.weight_adapter
import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit.harness import tiny_clip

KINDS = tiny_models.ADAPTER_KINDS


def assert_same_patches(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for target, adapter in want.items():
        other = got[target]
        assert type(other) is type(adapter), target
        parts = adapter.weights if hasattr(adapter, "weights") else adapter[1]
        other_parts = other.weights if hasattr(other, "weights") else other[1]
        for a, b in zip(parts, other_parts, strict=True):
            assert (a is b) if isinstance(a, torch.Tensor) else a == b, target


def load_both(pkg, key_map: dict, sd: dict) -> tuple[dict, dict, dict]:
    narrowed = pkg.key_map.for_file(key_map, sd)
    return (narrowed, comfy.lora.load_lora(sd, narrowed, log_missing=False),
            comfy.lora.load_lora(sd, key_map, log_missing=False))


def test_this_comfyui_loads_only_keys_under_the_entry(pkg):
    assert pkg.key_map.load_lora_reads_prefixed_keys()


@pytest.mark.parametrize("kind", KINDS + ("dora",))
@pytest.mark.parametrize("model", ["sd", "flux"])
def test_narrowed_map_loads_what_the_whole_map_loads(pkg, host, sd_patcher, flux_patcher, model, kind):
    patcher = sd_patcher if model == "sd" else flux_patcher
    targets = (tiny_models.flux_targets() if model == "flux"
               else tiny_models.sd_targets(host.unet_sd, kinds=("attn", "ff", "conv")))
    kw = {"dora": "out"} if kind == "dora" else {}
    sd = tiny_models.adapter_state_dict("lora" if kind == "dora" else kind, targets, seed=5, **kw)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    narrowed, got, want = load_both(pkg, key_map, sd)
    assert want, "the file loads"
    assert_same_patches(got, want)
    # a file names each layer one way: most of ComfyUI's entries are other namings' names
    assert len(narrowed) < len(key_map) / 2, (len(narrowed), len(key_map))


def test_kohya_file_with_diff_set_and_text_encoder_keys(pkg, host, sd_patcher):
    """Keys beside the adapters' own (diff, diff_b, set_weight, alpha) and one key map over the
    diffusion model and the text encoder, as split_patches makes it."""
    sd = tiny_models.sd_lora_state_dict(host.unet_sd, seed=7)
    layers = [k[: -len(".weight")] for k, w in host.unet_sd.items() if k.endswith(".weight") and w.ndim == 2]
    norm = [k[: -len(".weight")] for k, w in host.unet_sd.items() if k.endswith(".weight") and w.ndim == 1]
    sd[f"diffusion_model.{layers[0]}.diff"] = torch.randn_like(host.unet_sd[layers[0] + ".weight"])
    sd[f"diffusion_model.{layers[0]}.diff_b"] = torch.randn_like(host.unet_sd[layers[0] + ".bias"])
    sd[f"diffusion_model.{norm[0]}.set_weight"] = torch.randn_like(host.unet_sd[norm[0] + ".weight"])
    clip = tiny_clip()
    g = torch.Generator().manual_seed(8)
    for layer in range(2):
        for p in ("q_proj", "v_proj"):
            up, down = tiny_models.lora_factors(64, 64, 4, g)
            sd[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{p}.lora_up.weight"] = up
            sd[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{p}.lora_down.weight"] = down
    key_map = {**comfy.lora.model_lora_keys_unet(sd_patcher.model, {}),
               **comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})}
    _, got, want = load_both(pkg, key_map, sd)
    assert_same_patches(got, want)
    kinds = {a[0] if isinstance(a, tuple) else a.name for a in want.values()}
    assert {"diff", "set", "lora"} <= kinds, kinds
    assert any(t.startswith("clip_l.") for t in want), list(want)[:5]
    unet, te = pkg.adapters.split_patches(sd, sd_patcher, clip, "mixed.safetensors")
    assert_same_patches({**unet, **te}, want)


class _AsksElsewhere(comfy.weight_adapter.WeightAdapterBase):
    """A loader as a later ComfyUI might have one: it looks for a key that does not start with
    the entry, so an entry no key starts with could still load."""
    name = "elsewhere"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        f"unet.{x}.up" in lora  # noqa: B015 (the question is what matters, not the answer)
        return None


def test_whole_map_where_a_loader_asks_for_other_keys(pkg, host, sd_patcher, monkeypatch, caplog):
    monkeypatch.setattr(comfy.weight_adapter, "adapters", [*comfy.weight_adapter.adapters, _AsksElsewhere])
    pkg.key_map.load_lora_reads_prefixed_keys.cache_clear()
    try:
        with caplog.at_level("INFO", logger="lora_cache"):
            sd = tiny_models.sd_lora_state_dict(host.unet_sd, seed=9)
            key_map = comfy.lora.model_lora_keys_unet(sd_patcher.model, {})
            assert pkg.key_map.for_file(key_map, sd) is key_map
        assert "asks for keys that do not start with the layer's name" in caplog.text
    finally:
        monkeypatch.undo()
        pkg.key_map.load_lora_reads_prefixed_keys.cache_clear()
    assert pkg.key_map.load_lora_reads_prefixed_keys()
