"""lora_cache.merge (weights merged from cached factors into new parameters and the originals put
back, or merged in place and restored from a host copy) and the
direct dynamic forward of lora_cache.layers, on ComfyUI's Flux class with a tiny config:
its fused qkv / linear1 weights take diffusers q/k/v LoRAs as output slices."""
from __future__ import annotations

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch

from lora_cache_testkit import tiny_models


def flux_with_factors(pkg, dtype):
    """A tiny Flux model in `dtype` and a rank-4 LoRA's factors for it, built as the node builds
    them (ComfyUI's key map and load_lora, then adapters.plan_dynamic)."""
    cfg = comfy.supported_models.Flux(tiny_models.flux_config())
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "", device="cpu")
    tiny_models._randomize(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), mm.unet_offload_device())
    sd = tiny_models.flux_lora_state_dict(rank=4, seed=3)
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model, {}))
    plan = pkg.adapters.plan_dynamic(patches, patcher, "t.safetensors", torch.device("cpu"), dtype)
    assert plan.reason is None
    return patcher, patches, plan.layers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_restores_bit_exactly_over_50_toggles(pkg, dtype):
    merge, adapters = pkg.merge, pkg.adapters
    patcher, patches, plan_layers = flux_with_factors(pkg, dtype)
    model = patcher.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    items = [(model.get_submodule(p), fs, 0.8) for p, fs in plan_layers.items()]
    assert any(len(fs) > 1 for _, fs, _ in items), "expected sliced (fused qkv) targets"

    merged = merge.Merged(items)
    merged.merge()
    # The merged weights are ComfyUI's own merge (fp32, then cast) to within one rounding.
    per_key: dict[str, list] = {}
    for target, adapter in patches.items():
        offset = None if isinstance(target, str) else target[1]
        per_key.setdefault(adapters.target_key(target), []).append((0.8, adapter, 1.0, offset, None))
    for key, plist in per_key.items():
        want = comfy.lora.calculate_weight(plist, original[key].float(), key).to(dtype)
        got = model.state_dict()[key]
        # one rounding of the result (the factors are held in the model dtype, as the dynamic path holds them)
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        assert float((got.float() - want.float()).abs().max()) <= ulp * float(want.abs().max()), key
    assert merged.backup_bytes == sum(m.weight.numel() * m.weight.element_size() for m, _, _ in items)
    merged.restore()

    for i in range(50):
        merged.merge()
        now = model.state_dict()
        assert any(not torch.equal(now[k], original[k]) for k in original), f"toggle {i}: nothing merged"
        merged.restore()
        now = model.state_dict()
        for k, v in original.items():
            assert torch.equal(now[k], v), f"toggle {i}: {k} not restored bit for bit"
    assert merged.backup == {} and merged.backup_bytes == 0


def test_merge_never_writes_the_original_weights_and_puts_them_back(pkg):
    """Where the merged weights fit beside the originals, the layers get new parameters for the
    sampling: the original parameters are not written at all (fp32 and bf16), and restore puts
    the very same objects back."""
    merge = pkg.merge
    for dtype in (torch.float32, torch.bfloat16):
        patcher, _, plan_layers = flux_with_factors(pkg, dtype)
        model = patcher.model
        mods = {p: model.get_submodule(p) for p in plan_layers}
        params = {p: m.weight for p, m in mods.items()}
        values = {p: w.detach().clone() for p, w in params.items()}
        versions = {p: w._version for p, w in params.items()}
        m = merge.Merged([(mods[p], fs, -0.7) for p, fs in plan_layers.items()], keep_on_device=True)
        m.merge()
        assert all(mods[p].weight is not params[p] for p in mods)
        assert all(torch.equal(params[p], values[p]) and params[p]._version == versions[p] for p in mods)
        m.restore()
        assert all(mods[p].weight is params[p] for p in mods)
        assert all(torch.equal(params[p], values[p]) for p in mods)


def test_merge_keeps_copies_in_host_memory_when_asked(pkg):
    merge = pkg.merge
    patcher, _, plan_layers = flux_with_factors(pkg, torch.bfloat16)
    model = patcher.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    m = merge.Merged([(model.get_submodule(p), fs, 1.0) for p, fs in plan_layers.items()], keep_on_device=False)
    m.merge()
    assert m.where == "pinned host"
    m.restore()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_direct_forward_shares_one_down_projection_and_matches_merged(pkg):
    merge, layers = pkg.merge, pkg.layers
    patcher, _, plan_layers = flux_with_factors(pkg, torch.float32)
    model = patcher.model
    dm = model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    kw = {"timestep": torch.full((1,), 0.5), "context": torch.randn(1, 8, 48, generator=g),
          "y": torch.randn(1, 32, generator=g), "guidance": torch.full((1,), 3.5)}
    modules = [(model.get_submodule(p), fs) for p, fs in plan_layers.items()]
    with torch.inference_mode():
        base = dm(x, **kw)
        merged = merge.Merged([(m, fs, 0.7) for m, fs in modules])
        merged.merge()
        want = dm(x, **kw)
        merged.restore()
        for m, fs in modules:
            layers.activate(m, fs, 0.7)
        got = dm(x, **kw)
        for m, fs in modules:
            slot = layers.slot_of(m)
            assert slot.plan is not None and len(slot.plan) == 1, "direct path not planned"
            if len(fs) > 1:  # q/k/v slices of one fused weight: one shared down projection
                assert all(f.shared_down is fs[0].shared_down for f in fs)
                assert slot.plan[0][0] is fs[0].shared_down
                assert all(f.down.data_ptr() == fs[0].shared_down[:, f.shared_cols[0]:].data_ptr() for f in fs)
            layers.deactivate(m)
        assert not any(layers.is_installed(m) or "forward" in m.__dict__ for m, _ in modules)
        again = dm(x, **kw)
    assert not torch.allclose(base, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, base)
