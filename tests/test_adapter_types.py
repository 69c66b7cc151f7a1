"""Every weight adapter type ComfyUI loads (LoRA, LoHa, LoKr, GLoRA, OFT, BOFT, and DoRA on top)
through the LoRA Cache nodes on the real host: the cached path with its form named in the
reason, parity with the stock loader in every path and history (build, off, fast re-enable,
strength changes, switches between types, stacks mixing types in any order, merged copies), the
fast path doing no ComfyUI weight work, Flux's fused qkv, the text encoder, and bad input.

Stock references for SD come from the same prompt (wf.paired: a stock chain on `tiny_sd_ref`),
so stock's re-patching never touches the model our nodes run on."""
from __future__ import annotations

import shutil

import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.spies import count_weight_work

# name -> (kind, options): each a file for the SD model (attention Linears and resnet convs) and
# one for the Flux model (q/k/v onto the fused weights with offsets)
TYPES = {
    "loha": ("loha", {}), "lokr": ("lokr", {}), "glora": ("glora", {}), "oft": ("oft", {}),
    "boft": ("boft", {}), "dora": ("lora", {"dora": "out"}), "lokr_dora_in": ("lokr", {"dora": "in"}),
}
FORM = {  # what the build reason names for each
    "loha": "loha: low-rank", "lokr": "lokr: kron factors", "glora": "glora: low-rank on the input",
    "oft": "oft: block rotation", "boft": "boft: butterfly", "dora": "dora (output channels)",
    "lokr_dora_in": "dora (input channels)",
}


def sd_file(name: str) -> str:
    return f"type_{name}.safetensors"


def flux_file(name: str) -> str:
    return f"type_{name}_flux.safetensors"


@pytest.fixture(scope="module")
def typed(host):
    shutil.copyfile(host.unets / "tiny_sd.safetensors", host.unets / "tiny_sd_ref.safetensors")
    sd_targets = tiny_models.sd_targets(host.unet_sd, kinds=("attn", "conv"))
    for i, (name, (kind, kw)) in enumerate(TYPES.items()):
        tiny_models.write_lora(host.loras / sd_file(name),
                               tiny_models.adapter_state_dict(kind, sd_targets, seed=40 + i, **kw))
        tiny_models.write_lora(host.loras / flux_file(name),
                               tiny_models.adapter_state_dict(kind, tiny_models.flux_targets(), seed=60 + i, **kw))
    return list(TYPES)


def our_model(h):
    models = {id(e.model_ref()): e.model_ref() for e in h.lc.STORE.entries()
              if type(e.model_ref()).__name__ == "BaseModel"}
    assert len(models) == 1, models
    return next(iter(models.values()))


def run_events(h, prompt):
    h.lc.events.clear()
    got = h.run(prompt)
    return got, {e["node"]: e for e in h.events()}


def forms_of(h, lora: str) -> set[str]:
    return {f.kind for e in h.lc.STORE.entries() if e.lora == lora for fs in e.layers.values() for f in fs}


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
@pytest.mark.parametrize("name", list(TYPES))
def test_type_history_matches_stock_and_reenable_is_fast(fresh, typed, name, mode):
    """build, off, on again, a strength change (negative), in merged copies (auto) and unmerged
    (dynamic): each output equals the stock loader's with the same seed; the re-enable and the
    strength change are fast and make ComfyUI do no weight work on our model."""
    h = fresh
    lora = sd_file(name)
    history = [(0.8, True, "build"), (0.8, False, "off"), (0.8, True, "fast"), (-0.6, True, "fast")]
    model = None
    for step, (s, on, expected) in enumerate(history):
        with count_weight_work(only=model) as work:
            got, evs = run_events(h, wf.paired([(lora, s, on)], mode=mode))
        ev = evs["l0"]
        assert ev["path"] == expected, (step, ev)
        assert close(got["out"], got["ref"]), (step, (got["out"] - got["ref"]).abs().max())
        if expected == "build":
            assert FORM[name] in ev["reason"], ev
            model = our_model(h)
        elif on:
            assert dict(work) == {}, (step, dict(work))


def test_switching_between_cached_types_is_fast_and_matches_stock(fresh, typed):
    h = fresh
    names = ["lokr", "dora", "boft"]
    for name in names:  # each built once
        h.run(wf.paired([(sd_file(name), 1.0, True)]))
    model = our_model(h)
    for name in names[::-1] + names[1:2]:
        with count_weight_work(only=model) as work:
            got, evs = run_events(h, wf.paired([(sd_file(name), 0.9, True)]))
        assert evs["l0"]["path"] == "fast", evs["l0"]
        assert close(got["out"], got["ref"]), name
        assert dict(work) == {}, (name, dict(work))


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
def test_stacks_mixing_types_in_any_order_match_stock_chain(fresh, typed, mode):
    """Chains of three LoRA Cache nodes of different types on the same layers, in different
    orders, toggled and re-weighted, in merged copies (auto) and unmerged (dynamic): each equals
    the same chain of stock loaders. Once each file is cached every change is fast, also when an
    order-dependent type (DoRA, OFT, GLoRA, BOFT) gets another adapter before it."""
    h = fresh
    f = {n: sd_file(n) for n in typed}
    history = [
        [(f["dora"], 0.8, True), (f["oft"], 1.0, True), (f["lokr"], 0.7, True)],
        [(f["lokr"], 0.7, True), (f["dora"], 0.8, True), (f["oft"], 1.0, True)],
        [(f["oft"], -0.5, True), (f["lokr"], 0.7, True), (f["dora"], 0.8, True)],
        [(f["glora"], 0.9, True), (f["boft"], 0.6, True), (f["loha"], 1.2, True)],
        [(f["boft"], 0.6, True), (f["lokr_dora_in"], 1.1, True), (f["glora"], 0.9, True)],
        [(f["boft"], 0.6, True), (f["lokr_dora_in"], 1.1, False), (f["glora"], 0.9, True)],
        [(f["dora"], 0.8, True), (f["oft"], 1.0, True), (f["lokr"], 0.7, True)],
    ]
    built: set[str] = set()
    model = None
    for step, rows in enumerate(history):
        with count_weight_work(only=model) as work:
            got, evs = run_events(h, wf.paired(rows, mode=mode))
        assert close(got["out"], got["ref"]), (step, (got["out"] - got["ref"]).abs().max())
        for i, (lora, _, on) in enumerate(rows):
            ev = evs.get(f"l{i}")
            if ev is None:
                continue
            expected = "off" if not on else ("fast" if lora in built else "build")
            assert ev["path"] == expected, (step, i, ev)
            built.add(lora) if on else None
        if model is None:
            model = our_model(h)
        elif all(ev["path"] in ("fast", "off") for ev in evs.values()):
            assert dict(work) == {}, (step, dict(work))


def test_stack_node_with_mixed_types_equals_stock_chain(fresh, typed):
    h = fresh
    rows = [(sd_file("oft"), 0.9, True), (sd_file("dora"), -0.7, True), (sd_file("loha"), 1.0, True),
            (sd_file("boft"), 0.5, True)]
    ref = h.run(wf.paired(rows))["ref"]
    for expected in ("fast", "fast"):
        got = h.run(wf.stack_node(rows))
        ev = h.last_event()
        assert [r["path"] for r in ev["rows"]] == [expected] * 4, ev
        assert close(got["out"], ref)


@pytest.mark.parametrize("name", ["lokr", "dora", "oft", "glora"])
def test_merged_mode_matches_stock(fresh, typed, name):
    """Merged mode runs every layer on a merged copy of its weight (every form merged as ComfyUI
    merges it, fp32 then one rounding): the output equals stock, the base model afterwards is
    exactly the base."""
    h = fresh
    lora = sd_file(name)
    stock = h.run(wf.sd([wf.stock(lora, 0.7)]))["out"]
    base = h.run(wf.sd([], seed=5))["out"]
    got = h.run(wf.sd([wf.ours(lora, 0.7, mode="merged")]))
    ev, s = h.last_event(), h.lc.stats()["samplings"][-1]
    assert ev["path"] == "build" and ev["reason"].endswith("at sampling: merged copies wherever they fit"), ev
    assert s["copies"] == s["layers"] > 0 and s["built"] == s["copies"], s
    assert close(got["out"], stock)
    assert torch.equal(h.run(wf.sd([], seed=5))["out"], base)


def test_order_dependent_type_after_stock_loader_matches_stock(fresh, typed):
    """A stock LoraLoader before ours patches the weights ComfyUI loads; the DoRA / OFT forms
    derive from the weight as loaded, so the chain stays exact."""
    h = fresh
    plain = "plain.safetensors"
    tiny_models.write_lora(h.loras / plain, tiny_models.sd_lora_state_dict(h.unet_sd, seed=71))
    for name in ("dora", "oft"):
        lora = sd_file(name)
        want = h.run(wf.sd([wf.stock(plain, 0.8), wf.stock(lora, 0.9)]))["out"]
        got = h.run(wf.sd([wf.stock(plain, 0.8), wf.ours(lora, 0.9)]))["out"]
        assert h.last_event()["path"] in ("build", "fast")
        assert close(got, want), name


def test_stock_loader_after_order_dependent_type_matches_stock_chain(fresh, typed):
    """A stock LoraLoader after ours patches the same layers. In the stock chain that patch comes
    after the DoRA / OFT update, which reads the weight before it; our layers would see it merged
    already. So that adapter, and ours before it, go into the sampling patcher's patches at their
    place in the chain: every output equals the stock chain, the badge says why, ours after the
    stock loader stay cached, a repeated sampling patches nothing again, a base branch is exact.
    The same holds for a plain adapter of ours before a stock loader of an order-dependent one,
    and a stock loader of a plain one after a plain one of ours stays on the cached path."""
    h = fresh
    plain = "plain_after.safetensors"
    tiny_models.write_lora(h.loras / plain, tiny_models.sd_lora_state_dict(h.unet_sd, seed=72))
    lokr, loha = sd_file("lokr"), sd_file("loha")
    base = {43: h.run(wf.sd([], seed=43))["out"]}
    for name in ("dora", "oft"):
        lora = sd_file(name)
        chains = [
            ([wf.ours(lora, 0.9), wf.stock(plain, 0.8)], {"l0": "full"}),
            ([wf.ours(lokr, 0.7), wf.ours(lora, 0.9), wf.stock(plain, 0.8), wf.ours(loha, 1.1)],
             {"l0": "full", "l1": "full", "l3": "fast"}),
            # an order-dependent one of ours after the stock loader stays cached, also on a repeat
            ([wf.ours(lora, 0.9), wf.stock(plain, 0.8), wf.ours(sd_file("boft"), 0.6)],
             {"l0": "full", "l2": "fast"}),
            # a stock order-dependent adapter after a plain one of ours reads the weight with ours
            ([wf.ours(lokr, 0.7), wf.stock(lora, 0.9)], {"l0": "full"}),
        ]
        for nodes, paths in chains:
            stock_nodes = [wf.stock(inputs["lora_name"], inputs["strength_model"]) for _, inputs in nodes]
            want = {seed: h.run(wf.sd(stock_nodes, seed=seed))["out"] for seed in (42, 43)}
            got, evs = run_events(h, wf.sd(nodes, seed=42))
            assert close(got["out"], want[42]), (name, (got["out"] - want[42]).abs().max())
            for n, path in paths.items():
                if path == "full":
                    assert evs[n]["path"] == "full", evs
                    assert "ComfyUI's patches for this sampling, in chain order" in evs[n]["reason"], evs
                else:
                    assert evs[n]["path"] in ("build", "fast"), evs
            # only the sampler runs again: ComfyUI reuses the spliced patcher as it was
            with count_weight_work() as work:
                got, evs = run_events(h, wf.sd(nodes, seed=43))
            assert close(got["out"], want[43]) and evs == {}, evs
            assert work.get("patch_weight", 0) == 0, dict(work)
            got = h.run(wf.sd(nodes, seed=43, base_branch=True))
            assert torch.equal(got["base"], base[43]) and close(got["out"], want[43])
    got, evs = run_events(h, wf.sd([wf.ours(lokr, 0.7), wf.stock(plain, 0.8)]))
    assert all(ev["path"] != "full" for ev in evs.values()), evs
    assert close(got["out"], h.run(wf.sd([wf.stock(lokr, 0.7), wf.stock(plain, 0.8)]))["out"])

    # A chain grown after a splice: the spliced patcher is cloned on, and a stock loader after
    # another order-dependent adapter of ours splices that one in at its place as well.
    plain2 = "plain_after_2.safetensors"
    tiny_models.write_lora(h.loras / plain2, tiny_models.sd_lora_state_dict(h.unet_sd, seed=73))
    first = [wf.ours(sd_file("dora"), 0.9), wf.stock(plain, 0.8)]
    grown = first + [wf.ours(sd_file("oft"), 1.0), wf.stock(plain2, 0.6)]
    want = h.run(wf.sd([wf.stock(sd_file("dora"), 0.9), wf.stock(plain, 0.8), wf.stock(sd_file("oft"), 1.0),
                        wf.stock(plain2, 0.6)]))["out"]
    h.run(wf.sd(first))
    got, evs = run_events(h, wf.sd(grown))
    assert close(got["out"], want), (got["out"] - want).abs().max()
    assert evs["l2"]["path"] == "full" and "l0" not in evs, evs


@pytest.mark.parametrize("mode", ["auto", "unmerged"])
@pytest.mark.parametrize("name", ["loha", "lokr", "glora", "oft", "boft", "dora", "lokr_dora_in"])
def test_flux_fused_qkv_every_type_matches_stock(fresh, typed, name, mode):
    """On Flux, diffusers q/k/v of every type land on the fused qkv / linear1 weights as output
    slices; build, off, fast and a strength change equal stock, in merged copies and unmerged."""
    h = fresh
    lora = flux_file(name)
    refs = {s: h.run(wf.sd([wf.stock(lora, s)], model="flux"))["out"] for s in (0.8, -0.6)}
    base = h.run(wf.sd([], model="flux"))["out"]  # base weights back in place
    for s, on, expected in ((0.8, True, "build"), (0.8, False, "off"), (0.8, True, "fast"), (-0.6, True, "fast")):
        out = h.run(wf.sd([wf.ours(lora, s, enabled=on, mode=mode)], model="flux"))["out"]
        ev = h.last_event()
        assert ev["path"] == expected, ev
        if on:
            assert close(out, refs[s]), (s, (out - refs[s]).abs().max())
        else:
            assert torch.equal(out, base)
    entry = next(e for e in h.lc.STORE.entries() if e.lora == lora)
    qkv = entry.layers["diffusion_model.double_blocks.0.img_attn.qkv"]
    assert sorted(f.out_slice for f in qkv) == [(0, 64), (64, 64), (128, 64)]


def test_text_encoder_types_match_stock(fresh, typed):
    """LoKr, DoRA and OFT on the text encoder: the conditioning equals the stock LoraLoader's, off
    hands back the inputs (the bare CLIP's conditioning and the bare model's output, exactly) and
    a re-enable is fast."""
    h = fresh
    # A stock loader at strength 0 returns its inputs untouched: the bare CLIP and model.
    bare = h.run(wf.clip("LoraLoader", {"lora_name": sd_file("lokr"), "strength_model": 0.0,
                                        "strength_clip": 0.0}))
    for i, (kind, kw) in enumerate((("lokr", {}), ("lora", {"dora": "out"}), ("oft", {}))):
        name = f"te_{kind}_{i}.safetensors"
        targets = {f"lora_te_text_model_encoder_layers_{layer}_self_attn_{p}": (64, 64)
                   for layer in range(2) for p in ("q_proj", "v_proj", "out_proj")}
        targets.update({f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1": (128, 64) for layer in range(2)})
        tiny_models.write_lora(h.loras / name, tiny_models.adapter_state_dict(kind, targets, seed=80 + i, **kw))
        inputs = {"lora_name": name, "strength_model": 0.5, "strength_clip": 0.8}
        stock = h.run(wf.clip("LoraLoader", inputs))
        assert not close(stock["cond"][0], bare["cond"][0]), kind  # so off's equality below means something
        for enabled, expected in ((True, "build"), (False, "off"), (True, "fast")):
            got = h.run(wf.clip("LoraCacheLoader", {**inputs, "enabled": enabled, "mode": "auto"}))
            ev = h.last_event()
            if enabled:
                assert ev["clip_path"] == expected, ev["clip"]
                assert close(got["cond"][0], stock["cond"][0]), (kind, (got["cond"][0] - stock["cond"][0]).abs().max())
            else:
                # Off decides once for both sides, before either is looked at.
                assert (ev["path"], ev["clip_path"]) == ("off", None), ev
                assert torch.equal(got["cond"][0], bare["cond"][0]), kind
                assert torch.equal(got["out"], bare["out"]), kind


def test_text_encoder_stock_loader_after_dora_is_named_in_the_log(fresh, typed, caplog):
    """A stock loader after a DoRA text-encoder adapter of ours: the text encoder has no hook
    before its load to keep that order (the diffusion model does), so the log says the encoding
    differs from the stock chain and how to avoid it; with the stock loader first it is exact."""
    h = fresh
    targets = {f"lora_te_text_model_encoder_layers_{layer}_self_attn_{p}": (64, 64)
               for layer in range(2) for p in ("q_proj", "v_proj")}
    dora, plain = "te_order_dora.safetensors", "te_order_plain.safetensors"
    tiny_models.write_lora(h.loras / dora, tiny_models.adapter_state_dict("lora", targets, seed=85, dora="out"))
    tiny_models.write_lora(h.loras / plain, tiny_models.adapter_state_dict("lora", targets, seed=86))

    def chain(first: tuple[str, str], second: tuple[str, str]) -> dict:
        (cls0, lora0), (cls1, lora1) = first, second
        extra = {"enabled": True, "mode": "auto"}
        p = wf.clip(cls0, {"lora_name": lora0, "strength_model": 0.0, "strength_clip": 0.8,
                           **(extra if cls0 == "LoraCacheLoader" else {})})
        p["l1"] = {"class_type": cls1, "inputs": {"model": ["l0", 0], "clip": ["l0", 1], "lora_name": lora1,
                                                  "strength_model": 0.0, "strength_clip": 0.7,
                                                  **(extra if cls1 == "LoraCacheLoader" else {})}}
        p["5"]["inputs"]["model"] = ["l1", 0]
        p["t"]["inputs"]["clip"] = ["l1", 1]
        return p

    caplog.set_level("WARNING")
    h.run(chain(("LoraCacheLoader", dora), ("LoraLoader", plain)))
    assert any(dora in r.getMessage() and "Place stock LoRA loaders before this node" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    caplog.clear()
    want = h.run(chain(("LoraLoader", plain), ("LoraLoader", dora)))["cond"][0]
    got = h.run(chain(("LoraLoader", plain), ("LoraCacheLoader", dora)))["cond"][0]
    assert close(got, want) and not any("Place stock" in r.getMessage() for r in caplog.records)


def _malformed(unet_sd) -> dict[str, tuple[dict, str, str]]:
    """file -> (tensors, the key the error must name, the problem it must state)."""
    targets = tiny_models.sd_targets(unet_sd, kinds=("attn",))
    prefix = next(iter(targets))
    drop = object()
    # (file, kind, options, changes to the first layer's tensors, key named, problem stated)
    table = [
        ("bad_loha_missing", "loha", {}, {"hada_w2_b": drop}, f"{prefix}.hada_w2_b", "is missing"),
        ("bad_loha_shape", "loha", {}, {"hada_w1_b": torch.ones(4, 7)}, prefix, "the factors make"),
        ("bad_lokr_no_w2", "lokr", {}, {"lokr_w2_a": drop, "lokr_w2_b": drop}, prefix, "neither lokr_w2 nor"),
        ("bad_lokr_shape", "lokr", {}, {"lokr_w1": torch.ones(3, 4)}, prefix, "kron(w1"),
        ("bad_glora_missing", "glora", {}, {"b2.weight": drop}, f"{prefix}.b2.weight", "is missing"),
        ("bad_glora_shape", "glora", {}, {"a1.weight": torch.ones(5, 5)}, prefix, "do not share a rank"),
        ("bad_oft_blocks", "oft", {}, {"oft_blocks": torch.zeros(3, 8, 8)}, prefix, "do not cover"),
        ("bad_boft_alpha", "boft", {}, {"alpha": drop}, prefix, "has no alpha"),
        ("bad_dora_scale", "lora", {"dora": "out"}, {"dora_scale": torch.ones(7, 3)}, prefix,
         "ComfyUI cannot merge it"),
    ]
    cases = {}
    for name, kind, kw, changes, key, problem in table:
        sd = tiny_models.adapter_state_dict(kind, targets, seed=90, **kw)
        for weight, value in changes.items():
            if value is drop:
                del sd[f"{prefix}.{weight}"]
            else:
                sd[f"{prefix}.{weight}"] = value
        cases[f"{name}.safetensors"] = (sd, key, problem)
    return cases


def test_malformed_files_name_file_key_and_problem_and_cache_nothing(fresh, typed):
    h = fresh
    good = wf.sd([wf.ours(sd_file("lokr"))])
    for name, (sd, key, problem) in _malformed(h.unet_sd).items():
        tiny_models.write_lora(h.loras / name, sd)
        err = h.run(wf.sd([wf.ours(name)]), expect_error=True)
        msg = err["exception_message"]
        assert name in msg and key in msg and problem in msg, (name, msg)
        assert not [e for e in h.lc.STORE.entries() if e.lora == name], name
        h.run(good)  # the server keeps serving
    assert h.last_event()["path"] in ("build", "fast")
