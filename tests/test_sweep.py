"""The LoRA Cache Sweep and Grid nodes on the real ComfyUI (CPU, tiny models).

Image i of a sweep's batch is compared with image i of a separate sampling of the same seed and
batch size through the stock LoraLoader at setting i: ComfyUI draws the noise of a batch from the
seed for the whole batch, so only the same batch position has the same noise."""
from __future__ import annotations

import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit.compare import close

SWEEP = "LoraCacheSweep"


@pytest.fixture(scope="module")
def loras(host):
    names = host.sd_loras({"sw_a": (21, ("attn", "ff")), "sw_b": (22, ("attn",)), "sw_c": (23, ("ff",)),
                           "sw_conv": (24, ("attn", "conv"))})
    return {**names, "flux": host.flux_lora("sw_flux", 25)}


def _base(p: dict, model: str, batch) -> None:
    if model == "sd":
        p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd.safetensors", "weight_dtype": "default"}}
        p["2"] = {"class_type": "LotusConditioning", "inputs": {}}
        p["3"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}}
    else:
        p["1"] = {"class_type": "LCTestTinyFlux", "inputs": {}}
        p["2"] = {"class_type": "LCTestFluxCond", "inputs": {}}
        p["3"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": batch}}


def _sample(p: dict, nid: str, model_ref, latent_ref, tag: str, cfg: float, seed: int = 42) -> None:
    p[nid] = {"class_type": "KSampler", "inputs": {
        "model": model_ref, "seed": seed, "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["2", 0], "latent_image": latent_ref, "denoise": 1.0}}
    p[nid + "k"] = {"class_type": "LCTestLatentSink", "inputs": {"samples": [nid, 0], "tag": tag}}


def _chain(p: dict, prefix: str, model_ref, rows: list[tuple[str, str, float]]):
    for j, (cls, lora, s) in enumerate(rows):
        nid = f"{prefix}{j}"
        p[nid] = {"class_type": cls, "inputs": {"model": model_ref, "lora_name": lora, "strength_model": s}}
        if cls == "LoraCacheLoaderModelOnly":
            p[nid]["inputs"].update(enabled=True, mode="auto")
        model_ref = [nid, 0]
    return model_ref


def sweep_prompt(loras: list[str], strengths: str, model: str = "sd", cfg: float = 1.5, before=(), after=(),
                 batch=None, after_stock=()) -> dict:
    """UNET -> ordinary LoRA Cache loaders `before` -> sweep -> `after` -> KSampler on a latent of the
    sweep's batch_size (or `batch`) -> sink 'out'; the same model sampled bare -> sink 'base'."""
    p: dict = {}
    _base(p, model, 1)
    ref = _chain(p, "b", ["1", 0], [("LoraCacheLoaderModelOnly", n, s) for n, s in before])
    inputs = {"model": ref, "strengths": strengths, "strength_clip": 1.0}
    for i in range(4):
        inputs[f"lora_{i + 1}"] = loras[i] if i < len(loras) else "None"
    p["sw"] = {"class_type": SWEEP, "inputs": inputs}
    ref = _chain(p, "a", ["sw", 0], [("LoraCacheLoaderModelOnly", n, s) for n, s in after])
    ref = _chain(p, "t", ref, [("LoraLoaderModelOnly", n, s) for n, s in after_stock])
    p["3"]["inputs"]["batch_size"] = ["sw", 2] if batch is None else batch
    _sample(p, "5", ref, ["3", 0], "out", cfg)
    _sample(p, "6", ["1", 0], ["3", 0], "base", cfg)
    return p


def stock_prompt(settings: list[list[tuple[str, float]]], batch: int, model: str = "sd", cfg: float = 1.5) -> dict:
    """For each setting i: the stock LoraLoaderModelOnly chain, sampled on a batch of `batch` -> sink 'ref{i}'."""
    p: dict = {}
    _base(p, model, batch)
    for i, rows in enumerate(settings):
        ref = _chain(p, f"s{i}_", ["1", 0], [("LoraLoaderModelOnly", n, s) for n, s in rows])
        _sample(p, f"r{i}", ref, ["3", 0], f"ref{i}", cfg)
    return p


def check_against_stock(h, got: torch.Tensor, settings, model: str, cfg: float) -> None:
    refs = h.run(stock_prompt(settings, got.shape[0], model, cfg))
    for i in range(got.shape[0]):
        ref = refs[f"ref{i}"][i]
        assert close(got[i], ref), (i, settings[i], float((got[i] - ref).abs().max()))
    # the settings differ: a sweep that gave every image the same setting would not pass
    assert not close(refs["ref0"][0], refs[f"ref{len(settings) - 1}"][0]) or len(settings) == 1


@pytest.mark.parametrize("cfg", [1.5, 1.0])
@pytest.mark.parametrize("model", ["sd", "flux"])
def test_strength_sweep_matches_stock_per_image(fresh, loras, model, cfg):
    """A strength sweep with 0 and a negative strength: image i equals the stock LoraLoader at
    strength i (same seed, batch position); the 0 image and a branch without the sweep are the base."""
    h = fresh
    lora = loras["sw_a"] if model == "sd" else loras["flux"]
    strengths = [0.0, 0.5, -0.7, 1.0]
    got = h.run(sweep_prompt([lora], ", ".join(map(str, strengths)), model, cfg))
    out, base = got["out"], got["base"]
    assert out.shape[0] == 4
    ev = h.last_event()
    assert ev["path"] == "build" and "sweep of 4 images" in ev["reason"], ev
    assert torch.equal(out[0], base[0])  # strength 0: the base, bit for bit
    check_against_stock(h, out, [[(lora, s)] for s in strengths], model, cfg)


def test_lora_comparison_and_grid_match_stock(fresh, loras):
    """Several LoRAs at one strength, and LoRAs x strengths (LoRA-major)."""
    h = fresh
    a, b, conv = loras["sw_a"], loras["sw_b"], loras["sw_conv"]
    got = h.run(sweep_prompt([a, b, conv], "0.8"))["out"]
    check_against_stock(h, got, [[(a, 0.8)], [(b, 0.8)], [(conv, 0.8)]], "sd", 1.5)
    got = h.run(sweep_prompt([a, conv], "-0.5, 1.2"))["out"]
    check_against_stock(h, got, [[(a, -0.5)], [(a, 1.2)], [(conv, -0.5)], [(conv, 1.2)]], "sd", 1.5)


@pytest.mark.parametrize("model", ["sd", "flux"])
def test_stacked_with_ordinary_loaders(fresh, loras, model):
    """Ordinary LoRA Cache loaders before and after the sweep apply to every image (merged copies
    or unmerged, mode auto); the sweep's update comes on top per image."""
    h = fresh
    if model == "sd":
        sw, before, after = loras["sw_a"], [(loras["sw_b"], 0.6)], [(loras["sw_c"], -0.9)]
    else:
        sw, before, after = loras["flux"], [(loras["flux"], 0.4)], []
    got = h.run(sweep_prompt([sw], "0, 1, -0.6", model, before=before, after=after))["out"]
    settings = [[*before, (sw, s), *after] if s else [*before, *after] for s in (0.0, 1.0, -0.6)]
    check_against_stock(h, got, settings, model, 1.5)


def test_stock_loader_after_the_sweep(fresh, loras):
    """A stock LoraLoader after the sweep merges its LoRA into the weight; the sweep's update per
    image comes on top, as in the stock chain (both are additions)."""
    h = fresh
    sw, after = loras["sw_a"], [(loras["sw_b"], 0.7)]
    got = h.run(sweep_prompt([sw], "0.9, -0.4", after_stock=after))["out"]
    check_against_stock(h, got, [[(sw, 0.9), *after], [(sw, -0.4), *after]], "sd", 1.5)


def test_clip_gets_one_strength(fresh, loras):
    """With one LoRA, the text encoder gets strength_clip for every image: its encoding equals the
    stock LoraLoader's at that strength."""
    h = fresh
    name = "sw_te.safetensors"
    sd = dict(tiny_models.sd_lora_state_dict(h.unet_sd, seed=26, kinds=("attn",)))
    g = torch.Generator().manual_seed(27)
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            k = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            sd[k + ".lora_up.weight"] = 0.2 * torch.randn(64, 4, generator=g)
            sd[k + ".lora_down.weight"] = 0.2 * torch.randn(4, 64, generator=g)
    tiny_models.write_lora(h.loras / name, sd)
    p = sweep_prompt([name], "0, 1")
    p["c"] = {"class_type": "LCTestTinyClip", "inputs": {}}
    p["sw"]["inputs"].update(clip=["c", 0], strength_clip=0.7)
    p["te"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["sw", 1], "text": "a sweep"}}
    p["tk"] = {"class_type": "LCTestCondSink", "inputs": {"conditioning": ["te", 0], "tag": "cond"}}
    p["sl"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["c", 0], "lora_name": name,
                                                      "strength_model": 1.0, "strength_clip": 0.7}}
    p["se"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["sl", 1], "text": "a sweep"}}
    p["sk"] = {"class_type": "LCTestCondSink", "inputs": {"conditioning": ["se", 0], "tag": "ref"}}
    p["be"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": "a sweep"}}
    p["bk"] = {"class_type": "LCTestCondSink", "inputs": {"conditioning": ["be", 0], "tag": "bare"}}
    got = h.run(p)
    assert close(got["cond"][0], got["ref"][0]) and not close(got["bare"][0], got["ref"][0])
    ev = [e for e in h.events() if e["node"] == "sw"][-1]
    assert "at strength 0.7 for every image" in ev["clip"], ev
    p["sw"]["inputs"]["lora_2"] = loras["sw_b"]
    h.new_executor()
    got = h.run(p)
    assert torch.equal(got["cond"][0], got["bare"][0])  # several LoRAs: the text encoder is the input
    ev = [e for e in h.events() if e["node"] == "sw"][-1]
    assert "unchanged" in ev["clip"], ev


def test_batch_chunked_by_memory(fresh, loras, monkeypatch):
    """With too little memory for cond and uncond in one model call, ComfyUI runs them as
    separate calls (each the whole latent batch): the rows still map to their images."""
    import comfy.model_base
    h = fresh
    lora = loras["sw_a"]
    calls = []
    real = comfy.model_base.BaseModel.memory_required

    def too_much(self, input_shape, *args, **kwargs):
        calls.append(input_shape[0])
        return 1e30  # more than any free memory: one cond per model call
    monkeypatch.setattr(comfy.model_base.BaseModel, "memory_required", too_much)
    try:
        got = h.run(sweep_prompt([lora], "1, -1, 0.3"))["out"]
    finally:
        monkeypatch.setattr(comfy.model_base.BaseModel, "memory_required", real)
    assert 6 in calls  # ComfyUI tried cond and uncond together (2 x 3 rows), then split them
    check_against_stock(h, got, [[(lora, s)] for s in (1.0, -1.0, 0.3)], "sd", 1.5)


def test_row_layout_of_a_model_call(pkg, host):
    """The mapping ComfyUI's cond batching implies: len(cond_or_uncond) chunks of the whole latent
    batch in order; a call that does not fit is an error, not a wrap-around."""
    from lora_cache_loader.lora_cache import sweep
    sw = sweep.Sweep((object(), object()), sweep.settings(["a.safetensors", "b.safetensors"], [0.5, -1.0]))  # type: ignore[arg-type]
    rows = sweep.Rows(sw, torch.device("cpu"))
    rows.begin(8, 2)  # cond and uncond, 4 images each
    per_row = rows.of(torch.zeros(1))
    assert per_row.tolist() == [[0.5, -1.0, 0.0, 0.0] * 2, [0.0, 0.0, 0.5, -1.0] * 2]
    assert rows.active[0].tolist() == [0, 1, 4, 5] and rows.active[1].tolist() == [2, 3, 6, 7]
    rows.begin(4, None)
    assert rows.of(torch.zeros(1)).shape == (2, 4)
    for n, chunks in ((6, 2), (8, 1), (3, None)):
        with pytest.raises(host.lc.LoraCacheError, match="rows"):
            rows.begin(n, chunks)
    rows.end()
    with pytest.raises(host.lc.LoraCacheError, match="outside a model call"):
        rows.of(torch.zeros(1))
    # a strength sweep with a 0: the adapter changes 3 of 4 images, so it runs on every row (times 0
    # on the first image's) rather than on picked rows
    one = sweep.Sweep((object(),), sweep.settings(["a.safetensors"], [0.0, 0.5, 0.75, 1.0]))  # type: ignore[arg-type]
    rows = sweep.Rows(one, torch.device("cpu"))
    rows.begin(8, 2)
    assert rows.active == [None] and rows.of(torch.zeros(1)).tolist() == [[0.0, 0.5, 0.75, 1.0] * 2]


def test_batch_mismatch_is_a_node_error(fresh, loras):
    h = fresh
    err = h.run(sweep_prompt([loras["sw_a"]], "0, 0.5, 1", batch=2), expect_error=True)
    assert err["node_type"] == "KSampler", err
    assert "latent batch has 2 image(s) but the sweep has 3 settings" in err["exception_message"], err


def test_bad_strengths_are_a_node_error(fresh, loras):
    h = fresh
    err = h.run(sweep_prompt([loras["sw_a"]], "0, half, 1"), expect_error=True)
    assert err["node_type"] == SWEEP and "strength 'half' is not a number" in err["exception_message"], err
    err = h.run(sweep_prompt([], "1"), expect_error=True)
    assert "no LoRA selected" in err["exception_message"], err


def test_sweep_outputs_and_layers_bare_after(fresh, loras):
    """The labels name each image's setting (LoRA-major); the event lists them; after the sampling
    no layer keeps a forward of ours."""
    from lora_cache_loader.lora_cache import sweep
    h = fresh
    assert [s.label for s in sweep.settings(["x/a.safetensors", "b.safetensors"], [0.5, 1.0])] == [
        "a 0.5", "a 1", "b 0.5", "b 1"]
    assert [s.label for s in sweep.settings(["a.safetensors", "b.safetensors"], [0.8])] == ["a", "b"]
    assert [s.strengths for s in sweep.settings(["a", "b"], [0.8])] == [(0.8, 0.0), (0.0, 0.8)]
    h.run(sweep_prompt([loras["sw_a"], loras["sw_b"]], "0.5, 1"))
    ev = [e for e in h.events() if e["node"] == "sw"][-1]
    assert "sweep of 4 images (sw_a 0.5, sw_a 1, sw_b 0.5, sw_b 1)" in ev["reason"], ev
    entries = h.lc.STORE.entries()
    assert len(entries) == 2
    for e in entries:
        for _, module, _ in e.modules():
            assert "forward" not in module.__dict__


def test_grid_node(fresh):
    from lora_cache_loader.lora_cache import grid
    images = torch.zeros(3, 16, 24, 3)
    images[1] = 1.0
    out = grid.labelled_grid(images, ["s 0", "s 0.5", "s 1"])
    assert out.shape[0] == 1 and out.shape[2] == 3 * 24 and out.shape[1] > 16 and out.shape[3] == 3
    assert torch.equal(out[0, :16, 24:48], images[1]) and torch.equal(out[0, :16, :24], images[0])
    strip = out[0, 16:]
    for i in range(3):  # some dark text pixels under each image
        assert (strip[:, i * 24:(i + 1) * 24] < 0.5).any(), i
    two_rows = grid.labelled_grid(images, ["a", "b", "c"], columns=2)
    assert two_rows.shape[2] == 48 and two_rows.shape[1] == 2 * out.shape[1]
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        grid.labelled_grid(images, ["a", "b"])


@pytest.mark.server
@pytest.mark.parametrize("name, images", [("lora_cache_sweep", 4), ("lora_cache_compare", 2)])
def test_shipped_workflows_run_on_a_server(server, name, images):
    """The API-format workflows in workflows/api/ run on a real server: the sweep's batch_size feeds
    the latent, and the grid saves one picture with a labelled column per image."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from lora_cache_testkit import host
    prompt = json.loads((host.ROOT / "workflows" / "api" / f"{name}.json").read_text())
    res = server.run(prompt)
    errors = [d for t, d in res["messages"] if t == "execution_error"]
    assert res["status"] == 200 and not errors, (res.get("body"), errors)
    pngs = server.output_images(res["prompt_id"])
    assert len(pngs) == 1
    grid_img = np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB"), dtype=np.int16)
    assert grid_img.shape[1] == images * 64 and grid_img.shape[0] > 64, grid_img.shape
    cells = [grid_img[:64, i * 64:(i + 1) * 64] for i in range(images)]
    assert all(np.abs(cells[0] - c).max() > 4 for c in cells[1:])  # each image has its own setting
    assert all((grid_img[64:, i * 64:(i + 1) * 64] < 128).any() for i in range(images))  # a label under each


def test_base_copies_where_layers_cast_per_call(fresh, loras, monkeypatch):
    """Where ComfyUI casts a layer's weight on every call (as under dynamic VRAM), a swept layer
    without adapters of its own multiplies by a copy of its base weight kept on the device: built
    once, reused by the next sweep, given up by a sampling with an adapter on the layer. Every
    image still equals the stock loader's."""
    import comfy.ops
    h = fresh
    for cls in (comfy.ops.disable_weight_init.Linear, comfy.ops.disable_weight_init.Conv2d):
        monkeypatch.setattr(cls, "comfy_cast_weights", True)
    lora, other = loras["sw_a"], loras["sw_b"]
    strengths = [0.0, 0.5, -0.7, 1.0]
    first = h.run(sweep_prompt([lora], ", ".join(map(str, strengths))))
    s = h.lc.stats()["samplings"][-1]
    assert s["reason"].startswith("sweep of 4 images: "), s
    assert "copies of the base weight on swept layers: " in s["reason"], s
    assert s["built"] == s["copies"] == s["layers"] > 0 and s["bytes"] > 0, s
    # another sweep of the same LoRA: the copies hold no strength, so they serve it as they are,
    # and ComfyUI's cast runs on none of the layers the sweep touches (the prompt's bare branch
    # samples the same layers: the casts counted are those while our forward is installed)
    cast, casted = comfy.ops.cast_bias_weight, []

    def spy(module, *args, **kwargs):
        if "forward" in module.__dict__:
            casted.append(id(module))
        return cast(module, *args, **kwargs)
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", spy)
    second = h.run(sweep_prompt([lora], "1, -1"))["out"]
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", cast)
    s2 = h.lc.stats()["samplings"][-1]
    assert s2["copies"] == s["copies"] and s2["built"] == 0 and "none built" in s2["reason"], s2
    swept = {id(m) for e in h.lc.STORE.entries() for _, m, _ in e.modules()}
    assert swept and not swept & set(casted)
    # an ordinary adapter on some swept layers: there the copy is its merged copy, not the base
    stacked = h.run(sweep_prompt([lora], "0, 1", before=[(other, 0.6)]))["out"]
    s3 = h.lc.stats()["samplings"][-1]
    assert "merged copies: " in s3["reason"] and "copies of the base weight" in s3["reason"], s3
    assert torch.equal(first["out"][0], first["base"][0])  # strength 0: the base, bit for bit
    check_against_stock(h, first["out"], [[(lora, x)] for x in strengths], "sd", 1.5)
    check_against_stock(h, second, [[(lora, 1.0)], [(lora, -1.0)]], "sd", 1.5)
    check_against_stock(h, stacked, [[(other, 0.6)], [(other, 0.6), (lora, 1.0)]], "sd", 1.5)
    assert h.lc.copies.REGISTRY.count() > 0
    h.lc.purge()  # the cache's purge frees every copy, base copies too
    assert h.lc.copies.REGISTRY.count() == 0
