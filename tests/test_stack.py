"""Several adapters, strength changes and switches without rebuilds, dynamic CLIP,
the LoRA Cache Stack node, and a long random history checked against stock at every step.

Stock references come from the same prompt: a stock LoraLoader chain on `tiny_sd_ref` (the
same weights as `tiny_sd`, a separate model object), so stock's re-patching never touches the
model our nodes work on and every "no reload" assertion is about our model alone."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close
from lora_cache_testkit.spies import count_weight_work


@pytest.fixture(scope="module")
def pool(host):
    """Four LoRA files on different layer sets, and the reference copy of the model."""
    shutil.copyfile(host.unets / "tiny_sd.safetensors", host.unets / "tiny_sd_ref.safetensors")
    return list(host.sd_loras({"s_a": (11, ("attn", "ff")), "s_b": (12, ("attn",)), "s_c": (13, ("ff",)),
                               "s_d": (14, ("attn", "ff"))}).values())


def our_model(h):
    """The BaseModel our chains run on (tiny_sd), found through a cache entry."""
    models = {id(e.model_ref()): e.model_ref() for e in h.lc.STORE.entries()
              if type(e.model_ref()).__name__ == "BaseModel"}
    assert len(models) == 1, models
    return next(iter(models.values()))


def factor_ids(h) -> dict:
    return {e.identity.path: (id(e), tuple(id(f.down) for fs in e.layers.values() for f in fs))
            for e in h.lc.STORE.entries()}


def run_events(h, prompt):
    """Runs `prompt`; returns its sinks and our nodes' events of this run, by node id."""
    h.lc.events.clear()
    got = h.run(prompt)
    return got, {e["node"]: e for e in h.events()}


def test_stacked_adapters_add_remove_reenable_fast_and_match_stock(fresh, pool):
    """Two and three stacked adapters, removal of one, re-enabling a set seen before: after the
    first build of each file, every change is fast, reuses the same factor tensors and makes
    ComfyUI do no weight work on our model."""
    h = fresh
    a, b, c, _ = pool
    history = [
        ([(a, 0.8, True), (b, -0.6, True), (c, 1.0, False)], {"l0": "build", "l1": "build", "l2": "off"}),
        ([(a, 0.8, True), (b, -0.6, True), (c, 1.0, True)], {"l2": "build"}),            # third added
        ([(a, 0.8, True), (b, -0.6, False), (c, 1.0, True)], {"l1": "off", "l2": "fast"}),  # one removed
        ([(a, 0.8, False), (b, -0.6, False), (c, 1.0, False)], {"l0": "off", "l1": "off", "l2": "off"}),
        # the set seen before
        ([(a, 0.8, True), (b, -0.6, True), (c, 1.0, True)], {"l0": "fast", "l1": "fast", "l2": "fast"}),
        ([(a, 0.8, True), (b, -0.6, True), (c, 1.0, False)], {"l2": "off"}),
        ([(a, 0.8, True), (b, -0.6, True), (c, 1.0, True)], {"l2": "fast"}),
    ]
    model = None
    for step, (rows, expected) in enumerate(history):
        ids_before = factor_ids(h) if step else {}
        with count_weight_work(only=model) as work:
            got, evs = run_events(h, wf.paired(rows))
        assert close(got["out"], got["ref"]), (step, (got["out"] - got["ref"]).abs().max())
        for node, path in expected.items():
            assert evs[node]["path"] == path, (step, node, evs[node])
        if model is None:
            model = our_model(h)
            continue
        assert dict(work) == {}, (step, dict(work))  # no load, restore, patch or unload of our model
        ids_after = factor_ids(h)
        assert {k: v for k, v in ids_after.items() if k in ids_before} == ids_before, step  # nothing rebuilt


def test_switch_a_b_a_and_strength_sweep_are_fast_with_reasons(fresh, pool):
    h = fresh
    a, b, _, _ = pool
    for lora in (a, b):  # both cached
        h.run(wf.paired([(lora, 1.0, True)]))
    model = our_model(h)
    ids = factor_ids(h)
    steps = [(a, 1.0, f"switch {b}->{a}"), (b, 1.0, f"switch {a}->{b}"), (a, 1.0, f"switch {b}->{a}"),
             (a, 0.5, "strength 1->0.5"), (a, -0.7, "strength 0.5->-0.7"), (a, 0.0, None),
             (a, 2.0, "strength -0.7->2"), (b, 2.0, f"switch {a}->{b}")]
    for lora, s, reason in steps:
        with count_weight_work(only=model) as work:
            got, evs = run_events(h, wf.paired([(lora, s, True)]))
        ev = evs["l0"]
        assert close(got["out"], got["ref"]), (lora, s)
        if s == 0:
            assert ev["path"] == "off" and ev["reason"] == "strengths are 0"
            continue
        assert ev["path"] == "fast", ev
        assert reason in ev["reason"], ev
        assert dict(work) == {} and factor_ids(h) == ids


def test_clip_strengths_dynamic_match_stock_and_base_clip_stays_exact(fresh, pool):
    """The text encoder takes the cached path: builds once, then every re-enable and strength
    change is fast with no weight work on the text encoder, the conditioning equals the stock
    LoraLoader's, and an encode from the base CLIP in the same prompt is exactly the base."""
    h = fresh
    name = "te.safetensors"
    sd = dict(tiny_models.sd_lora_state_dict(h.unet_sd, seed=15, kinds=("attn",)))
    g = torch.Generator().manual_seed(16)
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            k = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            sd[k + ".lora_up.weight"] = 0.2 * torch.randn(64, 4, generator=g)
            sd[k + ".lora_down.weight"] = 0.2 * torch.randn(4, 64, generator=g)
        k = f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1"
        sd[k + ".lora_up.weight"] = 0.2 * torch.randn(128, 4, generator=g)
        sd[k + ".lora_down.weight"] = 0.2 * torch.randn(4, 64, generator=g)
    tiny_models.write_lora(h.loras / name, sd)

    def prompt(cls, s_clip, enabled=True):
        inputs = {"lora_name": name, "strength_model": 0.5, "strength_clip": s_clip}
        if cls == "LoraCacheLoader":
            inputs.update(enabled=enabled, mode="auto")
        p = wf.clip(cls, inputs)
        p["t0"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": "a tiny test prompt"}}
        p["9b"] = {"class_type": "LCTestCondSink", "inputs": {"conditioning": ["t0", 0], "tag": "cond_base"}}
        return p

    strengths = [0.7, -0.4, 1.3]
    refs = {s: h.run(prompt("LoraLoader", s))["cond"][0] for s in strengths}  # stock first, on the same CLIP
    base = h.run(prompt("LoraCacheLoader", 0.7, enabled=False))
    base_cond = base["cond"][0]
    assert torch.equal(base["cond_base"][0], base_cond)

    from lora_cache_testkit.harness import tiny_clip
    te = tiny_clip().cond_stage_model
    history = [(0.7, True, "build"), (0.7, False, "off"), (0.7, True, "fast"), (-0.4, True, "fast"),
               (1.3, True, "fast"), (0.7, True, "fast")]
    for i, (s, enabled, expected) in enumerate(history):
        with count_weight_work(only=te) as work:
            got = h.run(prompt("LoraCacheLoader", s, enabled))
        ev = h.last_event()
        assert torch.equal(got["cond_base"][0], base_cond), i  # the base CLIP's encode is exact
        if not enabled:
            assert ev["path"] == "off" and torch.equal(got["cond"][0], base_cond)
            continue
        assert ev["clip_path"] == expected, ev
        assert close(got["cond"][0], refs[s]), (s, (got["cond"][0] - refs[s]).abs().max())
        if expected == "fast":
            assert dict(work) == {}, (i, dict(work))
    assert "strength 1.3->0.7" in ev["clip"], ev


def test_stack_node_equals_chain_and_reports_rows(fresh, pool):
    h = fresh
    a, b, c, _ = pool
    rows = [(a, 0.9, True), (b, -0.5, True), (c, 0.7, False)]
    chain = h.run(wf.paired(rows))
    got = h.run(wf.stack_node(rows))
    ev = h.last_event()
    assert close(got["out"], chain["ref"]) and close(got["out"], chain["out"])
    assert ev["node"] == "st" and [r["path"] for r in ev["rows"]] == ["fast", "fast", "off"], ev
    assert ev["path"] == "fast"
    # one more row on (its first use), one changed strength: the cached rows stay fast
    rows2 = [(a, 0.9, True), (b, 0.4, True), (c, 0.7, True)]
    got = h.run(wf.stack_node(rows2))
    ev = h.last_event()
    assert [r["path"] for r in ev["rows"]] == ["fast", "fast", "build"] and ev["path"] == "build", ev
    assert "strength -0.5->0.4" in ev["rows"][1]["reason"]
    assert close(got["out"], h.run(wf.paired(rows2))["ref"])
    none = h.run(wf.stack_node([]))
    assert h.last_event()["path"] == "off"
    assert torch.equal(none["out"], h.run(wf.sd([]))["out"])


@pytest.mark.slow
def test_random_history_matches_stock_at_every_step(fresh, pool):
    """100 random steps over three chained nodes and four files: toggles, switches, strength
    changes (negative and zero included) and file rewrites. Every step's output equals the
    stock chain's; each executed node takes the path the cache state implies (fast exactly when
    the file is cached unchanged), and our model is never reloaded."""
    h = fresh
    rng = random.Random(1234)
    strengths = [-1.0, -0.5, 0.0, 0.3, 0.8, 1.0, 1.5]
    rows = [[pool[i], 1.0, True] for i in range(3)]
    version = {name: 0 for name in pool}
    stock_names: dict[str, str] = {}
    cached: set[tuple[str, int]] = set()
    model = None
    counted = {"fast": 0, "build": 0, "off": 0}
    for step in range(100):
        action = rng.choice(["toggle", "switch", "strength", "strength", "rewrite"] if step else ["none"])
        i = rng.randrange(3)
        if action == "toggle":
            rows[i][2] = not rows[i][2]
        elif action == "switch":
            rows[i][0] = rng.choice([n for n in pool if n != rows[i][0]])
        elif action == "strength":
            rows[i][1] = rng.choice([s for s in strengths if s != rows[i][1]])
        elif action == "rewrite":
            name = rng.choice(pool)
            version[name] += 1
            sd = tiny_models.sd_lora_state_dict(h.unet_sd, seed=100 + 10 * pool.index(name) + version[name])
            tiny_models.write_lora(h.loras / name, sd)
            stock_names[name] = f"ref{version[name]}_{name}"
            tiny_models.write_lora(h.loras / stock_names[name], sd)
        with count_weight_work(only=model) as work:
            got, evs = run_events(h, wf.paired([tuple(r) for r in rows], seed=7, stock_names=stock_names))
        assert close(got["out"], got["ref"]), (step, action, rows, (got["out"] - got["ref"]).abs().max())
        for n in range(3):
            ev = evs.get(f"l{n}")
            if ev is None:
                continue  # not re-executed: ComfyUI reused its cached output
            lora, s, on = rows[n]
            if not on or s == 0:
                expected = "off"
            elif (lora, version[lora]) in cached:
                expected = "fast"
            else:
                expected = "build"
                cached.add((lora, version[lora]))
            assert ev["path"] == expected, (step, action, n, rows, ev)
            counted[expected] += 1
        if model is None:
            model = our_model(h)
        elif action != "none":
            assert dict(work) == {}, (step, action, dict(work))
    assert counted["fast"] > 40 and counted["build"] > 5 and counted["off"] > 10, counted


def test_dropped_clip_clone_leaves_text_encoder_bare(fresh, pool):
    """A CLIP clone whose adapters are active and that is freed by the garbage collector (in a
    reference cycle, where weak references die before ModelPatcher.__del__ ejects) must not
    leave its adapter active on the shared text encoder."""
    import gc

    from lora_cache_testkit.harness import tiny_clip

    h = fresh
    name = "te_drop.safetensors"
    g = torch.Generator().manual_seed(17)
    sd = {}
    for proj in ("q_proj", "v_proj"):
        k = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
        sd[k + ".lora_up.weight"] = 0.3 * torch.randn(64, 4, generator=g)
        sd[k + ".lora_down.weight"] = 0.3 * torch.randn(4, 64, generator=g)
    tiny_models.write_lora(h.loras / name, sd)
    clip = tiny_clip()
    tokens = clip.tokenize("a tiny test prompt")
    base = clip.encode_from_tokens(tokens)
    _, ours, ev = h.lc.apply(None, clip, name, 0.0, 0.9)
    assert ev.clip_path == "build"
    with_adapter = ours.encode_from_tokens(tokens)
    assert not close(with_adapter, base)
    from lora_cache_loader.lora_cache import layers
    modules = [m for e in h.lc.STORE.entries() if e.lora == name for _, m, _ in e.modules()]
    assert modules and all(layers.is_installed(m) for m in modules)  # active after the encode
    ours.patcher.cycle = ours.patcher  # only the cycle collector can free it now
    del ours
    gc.collect()
    assert not any(layers.is_installed(m) for m in modules)
    assert torch.equal(clip.encode_from_tokens(tokens), base)
