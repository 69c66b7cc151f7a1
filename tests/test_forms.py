"""The cached form of every weight adapter type ComfyUI loads (lora_cache.adapter_forms / forms),
layer by layer on the tiny SD and Flux models: each targeted layer's forward with the forms
active equals the layer with ComfyUI's own merged weight (comfy.lora.calculate_weight, the
stock patch path), for every type, strength, stack order and fused-qkv slice; merged copies
equal ComfyUI's merge; moving a layer's forms moves every tensor they hold. Equal: within
the rounding of sums of the layer's length (compare.tolerance), against a float64 reference."""
from __future__ import annotations

import contextlib
import logging
import random
import weakref

import comfy.lora
import pytest
import torch

from lora_cache_testkit import compare, tiny_models

KINDS = tiny_models.ADAPTER_KINDS
CASES = [(k, {}) for k in KINDS] + [
    ("loha", {"variant": "tucker"}), ("lokr", {"variant": "full"}), ("lokr", {"variant": "tucker"}),
    ("glora", {"variant": "old"}), ("oft", {"variant": "constrained"}),
    ("lora", {"dora": "out"}), ("lora", {"dora": "in"}), ("loha", {"dora": "out"}),
    ("lokr", {"dora": "out"}), ("lokr", {"dora": "in"}), ("oft", {"dora": "out"}),
]


def case_id(case) -> str:
    kind, kw = case
    return kind + "".join(f"-{v}" for v in kw.values())


def targets_for(model: str, host, kind: str, kw: dict) -> dict:
    if model == "flux":
        return tiny_models.flux_targets()
    if kw.get("variant") == "tucker":
        return tiny_models.sd_targets(host.unet_sd, kinds=("conv",))
    if kind == "glora" and kw.get("variant") == "old":
        return tiny_models.sd_targets(host.unet_sd, kinds=("attn",))
    return tiny_models.sd_targets(host.unet_sd, kinds=("attn", "ff", "conv"))


def build(pkg, patcher, sd: dict, name: str = "t.safetensors"):
    patches, _ = pkg.adapters.split_patches(sd, patcher, None, name)
    plan = pkg.adapters.cached_forms(patches, patcher, name, torch.device("cpu"), torch.float32)
    return patches, plan


def stock_terms(patches_chain, key: str, weight: torch.Tensor) -> list[torch.Tensor]:
    """ComfyUI's merge of `key` from a chain [(patches, strength), ...] as add_patches and the
    patch path compute it, one adapter at a time, in float64: [W, W1 - W, W2 - W1, ...], whose
    sum is the merged weight. float64 makes the merge exact for a reference; OFT and BOFT invert
    their rotation in float32 whatever the weight's dtype (ComfyUI logs the mismatch and skips the
    layer), so they are merged in float32, as stock merges them: that adds the rounding of sums
    over one rotation block (8 terms) to the reference, far below a layer's tolerance."""
    plist = []
    for patches, strength in patches_chain:
        for target, adapter in patches.items():
            if (target if isinstance(target, str) else target[0]) == key:
                offset = None if isinstance(target, str) else target[1]
                function = None if isinstance(target, str) or len(target) < 3 else target[2]
                plist.append((strength, adapter, 1.0, offset, function))
    w = weight.detach().double()
    terms = [w]
    for patch in plist:
        for dtype in (torch.float64, torch.float32):
            with logged_errors() as errors:
                merged = comfy.lora.calculate_weight([patch], w.to(dtype, copy=True), key, intermediate_dtype=dtype)
            merged = merged.double()
            if not errors:
                break
        else:
            raise AssertionError(f"ComfyUI did not merge {key}: {errors}")
        terms.append(merged - w)
        w = merged
    return terms


@contextlib.contextmanager
def logged_errors():
    """The messages logged at ERROR or above inside the block (ComfyUI's merge logs the
    adapters it skips)."""
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        yield errors
    finally:
        logging.getLogger().removeHandler(handler)


@contextlib.contextmanager
def tensor_copies():
    """Every `Tensor.copy_` while inside: its `non_blocking` flag, one entry per copy."""
    seen: list[bool] = []
    real = torch.Tensor.copy_
    torch.Tensor.copy_ = lambda self, src, non_blocking=False: seen.append(non_blocking) or real(self, src)
    try:
        yield seen
    finally:
        torch.Tensor.copy_ = real


def sample_input(module, seed: int = 0, rows: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, torch.nn.Linear):
        return torch.randn(2, rows // 2, module.in_features, generator=g)
    return torch.randn(1, module.in_channels, 8, 8, generator=g)


def layer_op(module):
    """The layer's own computation as op(x, weight, bias)."""
    if isinstance(module, torch.nn.Linear):
        return torch.nn.functional.linear
    return module._conv_forward


def assert_equals_merged(module, got: torch.Tensor, x: torch.Tensor, terms: list[torch.Tensor], what) -> None:
    """`got` is the layer's output for input `x` with the stock merged weight (`stock_terms`),
    within the rounding of its dtype: against the float64 reference, the tolerance of sums of the
    layer's length over the magnitude of the weight and each adapter's difference
    (compare.reference, compare.tolerance)."""
    ref, magnitude = compare.reference(layer_op(module), x, terms, module.bias)
    tol = compare.tolerance(magnitude, compare.reduction_length(terms[0]) + 1, got.dtype)
    ratio = compare.error_ratio(got, ref, tol)
    assert ratio <= 1, (what, ratio)


def check_layers(pkg, patcher, chain, layer_paths, rows=6):
    """Activates `chain` [(plan layers, patches, strength)] on every layer, compares each layer's
    forward (on `rows` input rows) with the stock merged weight's, then deactivates."""
    model = patcher.model
    for path in layer_paths:
        module = model.get_submodule(path)
        pkg.layers.activate(module, [(layers[path], s) for layers, _, s in chain if path in layers])
        try:
            x = sample_input(module, rows=rows)
            with torch.no_grad():
                got = module(x)
                terms = stock_terms([(p, s) for _, p, s in chain], path + ".weight", module.weight)
            assert_equals_merged(module, got, x, terms, path)
        finally:
            pkg.layers.deactivate(module)


@pytest.mark.parametrize("model", ["sd", "flux"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_type_equals_stock_merge_per_layer(pkg, host, sd_patcher, flux_patcher, model, case):
    kind, kw = case
    patcher = sd_patcher if model == "sd" else flux_patcher
    if model == "flux" and kw.get("variant") == "tucker":
        pytest.skip("Tucker cores are for convolutions")
    sd = tiny_models.adapter_state_dict(kind, targets_for(model, host, kind, kw), seed=3, **kw)
    if (kind, kw.get("variant")) == ("lokr", "tucker") and not comfy_merges_lokr_tucker():
        # torch.kron refuses the non-contiguous Tucker product, so ComfyUI logs an error and
        # skips the layer; the node says so instead of serving something else
        with pytest.raises(pkg.adapters.LoraCacheError, match="ComfyUI cannot merge it"):
            build(pkg, patcher, sd)
        return
    patches, plan = build(pkg, patcher, sd)
    assert plan.reason is None, plan.reason
    assert len(plan.layers) >= 3
    for s in (1.0, 0.6, -1.3):
        check_layers(pkg, patcher, [(plan.layers, patches, s)], plan.layers)


def comfy_merges_lokr_tucker() -> bool:
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", torch.ones(2, 2, 3, 3), torch.ones(2, 4), torch.ones(2, 4))
    try:
        torch.kron(torch.ones(2, 2, 1, 1), w2)
        return True
    except RuntimeError:
        return False


def test_fused_qkv_slices_for_every_type(pkg, flux_patcher):
    """Flux's diffusers q/k/v land on the fused qkv / linear1 weights as output slices."""
    for kind in KINDS:
        sd = tiny_models.adapter_state_dict(kind, tiny_models.flux_targets(), seed=5)
        _, plan = build(pkg, flux_patcher, sd)
        qkv = plan.layers["diffusion_model.double_blocks.0.img_attn.qkv"]
        slices = sorted(getattr(f, "out_slice", None) or (0, 0) for f in qkv if f.kind != "input low-rank")
        if kind == "glora":  # a partial target depends on the slice's weight: ComfyUI's merge
            assert all(f.kind == "stock delta" for f in qkv), kind
        assert slices == [(0, 64), (64, 64), (128, 64)], (kind, slices)


# A LoKr trained on a fused q/k/v projection, on a model with separate q, k, v layers: newer
# ComfyUI loads it once per layer, each LoKrAdapter with its `key` and `row_offset`, and its merge
# narrows kron(w1, w2) (3 layers' rows) to the layer's rows from row_offset. The hosts here have
# neither field and their key maps make no such patches, so the adapters are ComfyUI's own
# LoKrAdapter with the two fields set, and the reference is that narrowed product.
FUSED_LOKR = {  # name -> (rows of w1 (the product's row blocks are 3 * rows / that), w2 as a product)
    "blocks-across-layers": (4, True), "blocks-within-layers": (6, False),
}


def fused_qkv_lokr(patcher, w1_rows: int, w2_product: bool, seed: int = 11) -> tuple[dict, list[str]]:
    """{q/k/v weight key: adapter} for the first self-attention of the SD model, and the paths."""
    import comfy.weight_adapter
    paths = [next(n for n, _ in patcher.model.named_modules() if n.endswith("attn1.to_q"))]
    paths += [paths[0][: -len("to_q")] + p for p in ("to_k", "to_v")]
    out_dim, in_dim = patcher.model.get_submodule(paths[0]).weight.shape
    g = torch.Generator().manual_seed(seed)
    a, c = w1_rows, 3 * out_dim // w1_rows
    b, d = 4, in_dim // 4
    sd = {"fused.lokr_w1": 0.5 * torch.randn(a, b, generator=g)}
    if w2_product:
        sd.update({"fused.lokr_w2_a": 0.2 * torch.randn(c, 4, generator=g),
                   "fused.lokr_w2_b": 0.2 * torch.randn(4, d, generator=g)})
        alpha = 2.0
    else:
        sd["fused.lokr_w2"] = 0.05 * torch.randn(c, d, generator=g)
        alpha = None  # full factors: no rank to divide by (ComfyUI versions differ on alpha there)
    patches = {}
    for i, path in enumerate(paths):
        adapter = comfy.weight_adapter.LoKrAdapter.load("fused", sd, alpha, None)
        adapter.key, adapter.row_offset = path + ".weight", i * out_dim
        patches[path + ".weight"] = adapter
    return patches, paths


def narrowed_kron(adapter, shape: tuple) -> torch.Tensor:
    """Newer ComfyUI's LoKr update per unit strength on a fused product's layer, in float64:
    kron(w1, w2) (each from its factors where given, alpha over the rank of the last one formed),
    its rows from row_offset, shaped as the layer's weight."""
    w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, _t2, _dora = adapter.weights
    dim = None
    if w1 is None:
        dim, w1 = w1_b.shape[0], w1_a.double() @ w1_b.double()
    if w2 is None:
        dim, w2 = w2_b.shape[0], w2_a.double() @ w2_b.double()
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1.double(), w2.double()).narrow(0, adapter.row_offset, shape[0]).reshape(shape)


@pytest.mark.parametrize("name", list(FUSED_LOKR))
def test_lokr_on_rows_of_a_fused_product_equals_the_narrowed_kron(pkg, sd_patcher, name):
    """Each of q, k, v takes its rows of the fused product as kron factors (w1 cut to the row
    blocks its rows fall in, the product narrowed where a block spans two layers): the layer's
    forward and a merged copy equal the weight plus the narrowed kron, at several strengths."""
    patches, paths = fused_qkv_lokr(sd_patcher, *FUSED_LOKR[name])
    _, plan = build_patches(pkg, sd_patcher, patches)
    assert plan.reason is None and "lokr: kron factors, the layer's rows of a fused product on 3" in plan.form_note
    spans = {p: plan.layers[p][0].rows for p in paths}
    if name == "blocks-across-layers":  # 240-row blocks: k starts and v ends inside one
        assert any(r is not None for r in spans.values()), spans
    else:
        assert all(r is None for r in spans.values()), spans
    for path in paths:
        module = sd_patcher.model.get_submodule(path)
        weight = module.weight.detach().clone()
        update = narrowed_kron(patches[path + ".weight"], tuple(weight.shape))
        for s in (1.0, 0.6, -1.3):
            pkg.layers.activate(module, [(plan.layers[path], s)])
            try:
                x = sample_input(module)
                with torch.no_grad():
                    got = module(x)
            finally:
                pkg.layers.deactivate(module)
            assert_equals_merged(module, got, x, [weight, s * update], (path, s))
            copy = pkg.copies.build(module, ((plan.layers[path], s),), pkg.copies.CopyKey((), ()),
                                    weight.dtype, weight.device)
            terms = [weight.double(), s * update]
            tol = compare.tolerance(sum(t.abs() for t in terms), compare.reduction_length(weight) + 2, weight.dtype)
            assert compare.error_ratio(copy.weight, sum(terms), tol) <= 1, (path, s)
        assert torch.equal(module.weight, weight)


def test_lokr_rows_that_do_not_fit_the_fused_product_name_the_problem(pkg, sd_patcher):
    """Rows past the end of the product, or rows of another width: the node error names the
    layer, the product's shape and the row offset."""
    for change, row_offset in (("past the end", 1), ("another width", 0)):
        patches, paths = fused_qkv_lokr(sd_patcher, 4, False)
        adapter = patches[paths[2] + ".weight"]
        if change == "past the end":
            adapter.row_offset += row_offset
        else:
            w = list(adapter.weights)
            w[1] = w[1][:, :-1]
            adapter.weights = tuple(w)
        with pytest.raises(pkg.adapters.LoraCacheError, match="do not make the layer's weight") as e:
            build_patches(pkg, sd_patcher, patches)
        assert paths[2] in str(e.value) and f"row_offset {adapter.row_offset}" in str(e.value), str(e.value)


def test_rebuilt_adapters_keep_their_other_fields(pkg, sd_patcher):
    """Where an adapter is rebuilt around moved tensors (ComfyUI's merge kept per strength, a
    move between devices) it keeps what else it carries, such as a LoKr's row offset."""
    patches, paths = fused_qkv_lokr(sd_patcher, 4, True)
    adapter = patches[paths[1] + ".weight"]
    twin = pkg.forms.with_weights(adapter, tuple(adapter.weights))
    assert (twin.key, twin.row_offset, type(twin)) == (adapter.key, adapter.row_offset, type(adapter))
    form = pkg.forms.StockDelta(adapter, adapter.key, None, None)
    form.move(pkg.arena.Arena(form.tensors(), torch.device("cpu")))
    assert form.adapter is not adapter and form.adapter.row_offset == adapter.row_offset


def build_patches(pkg, patcher, patches: dict, name: str = "t.safetensors"):
    return patches, pkg.adapters.cached_forms(patches, patcher, name, torch.device("cpu"), torch.float32)


def test_mixed_stack_in_any_order_equals_stock_chain(pkg, host, sd_patcher, flux_patcher):
    """A stack of every type on the same layers, in several orders and strengths, equals the
    chain of stock loaders in that order (order-dependent types included)."""
    for model, patcher in (("sd", sd_patcher), ("flux", flux_patcher)):
        built = {}
        for i, (kind, kw) in enumerate([("lora", {}), ("oft", {}), ("lora", {"dora": "out"}), ("lokr", {}),
                                        ("glora", {}), ("boft", {}), ("loha", {}), ("lokr", {"dora": "in"})]):
            sd = tiny_models.adapter_state_dict(kind, targets_for(model, host, kind, kw), seed=10 + i, **kw)
            patches, plan = build(pkg, patcher, sd)
            assert plan.reason is None, (kind, plan.reason)
            built[case_id((kind, kw))] = (plan.layers, patches)
        names = list(built)
        rng = random.Random(7)
        for _ in range(4):
            order = names[:]
            rng.shuffle(order)
            chain = [(built[n][0], built[n][1], rng.choice([1.0, 0.7, -0.5, 1.4])) for n in order[:5]]
            paths = sorted(set().union(*(layers.keys() for layers, _, _ in chain)))
            check_layers(pkg, patcher, chain, paths)


def count_weight_update(pkg, monkeypatch) -> list:
    """Wraps this package's weight update (into a new tensor: merged_weight; in place:
    add_in_place) to count the layers it serves, and how it starts the new weight."""
    calls: list = []
    real, in_place = pkg.weight_update.merged_weight, pkg.weight_update.add_in_place

    def counted(weight, wp):
        calls.append("tiles" if wp.tiles else "whole" if wp.steps[0].start is None else "copy")
        return real(weight, wp)

    def counted_in_place(weight, wp):
        calls.append("in place")
        return in_place(weight, wp)
    monkeypatch.setattr(pkg.weight_update, "merged_weight", counted)
    monkeypatch.setattr(pkg.weight_update, "add_in_place", counted_in_place)
    return calls


def lora_chain(pkg, patcher, targets, strengths, seed=40):
    chain = []
    for i, s in enumerate(strengths):
        sd = tiny_models.adapter_state_dict("lora", targets, seed=seed + i)
        patches, plan = build(pkg, patcher, sd)
        assert plan.reason is None, plan.reason
        chain.append((plan.layers, patches, s))
    return chain


@pytest.mark.parametrize("model", ["sd", "flux"])
@pytest.mark.parametrize("rows", [6, 2048])
def test_low_rank_update_in_the_weight_or_the_output_equals_stock(pkg, host, sd_patcher, flux_patcher, model,
                                                                   rows, monkeypatch):
    """Plain LoRA on Linear layers is added per call either into a transient weight (where the
    weight is smaller than the activations: many rows) or into the output (few rows); both give
    the stock chain's merged weight's output: one adapter, two stacked, strengths 0 and negative,
    Flux's q/k/v(/mlp) slices covering a fused weight and covering part of it."""
    patcher = sd_patcher if model == "sd" else flux_patcher
    targets = targets_for(model, host, "lora", {})
    partial = {k: v for k, v in targets.items() if not k.endswith(("to_v", "add_v_proj"))}
    calls = count_weight_update(pkg, monkeypatch)
    for tg, strengths in ((targets, [1.0]), (targets, [0.7, -1.3]), (partial, [0.0, 1.2])):
        chain = lora_chain(pkg, patcher, tg, strengths)
        paths = sorted(set().union(*(layers.keys() for layers, _, _ in chain)))
        linear = [p for p in paths if isinstance(patcher.model.get_submodule(p), torch.nn.Linear)]
        calls.clear()
        check_layers(pkg, patcher, chain, paths, rows=rows)
        # every Linear layer here is smaller than 2048 rows of activations, larger than 6
        assert len(calls) == (len(linear) if rows > 6 else 0), (model, tg is partial, len(calls), len(linear))
        if model == "flux" and rows > 6:  # how the transient weight is started on fused weights
            assert ("copy" if tg is partial else "tiles") in calls, calls


def test_weight_update_after_stock_lowvram_patch_through_comfy_cast(pkg, host, sd_patcher, monkeypatch):
    """Where ComfyUI casts the layer's weight per call, the weight update goes in as one of the
    layer's weight functions for that call, after ComfyUI's own lowvram patch of a stock loader
    before ours: the output is the stock chain's, and the layer's weight functions are as they
    were afterwards."""
    import comfy.model_patcher
    model = sd_patcher.model
    targets = targets_for("sd", host, "lora", {})
    stock_sd = tiny_models.adapter_state_dict("lora", targets, seed=50)
    stock_patches, _ = pkg.adapters.split_patches(stock_sd, sd_patcher, None, "stock.safetensors")
    chain = lora_chain(pkg, sd_patcher, targets, [0.9], seed=51)
    layers_, ours, s = chain[0]
    calls = count_weight_update(pkg, monkeypatch)
    checked = 0
    for path in layers_:
        module = model.get_submodule(path)
        if not isinstance(module, torch.nn.Linear):
            continue
        key = path + ".weight"
        stock = [(0.6, a, 1.0, None, None) for t, a in stock_patches.items() if t == key]
        assert stock, key
        monkeypatch.setattr(module, "comfy_cast_weights", True)
        monkeypatch.setattr(module, "weight_function", [comfy.model_patcher.LowVramPatch(key, {key: stock})])
        before = list(module.weight_function)
        weight = module.weight.detach().clone()
        pkg.layers.activate(module, [(layers_[path], s)])
        try:
            x = sample_input(module, rows=2048)
            with torch.no_grad():
                got = module(x)
            assert_equals_merged(module, got, x, stock_terms([(stock_patches, 0.6), (ours, s)], key, weight), path)
            assert module.weight_function == before and torch.equal(module.weight, weight), path
        finally:
            pkg.layers.deactivate(module)
        checked += 1
    # a weight function before ours may hand on a tensor it keeps: the update goes into a new one
    assert checked and len(calls) == checked and "in place" not in calls, (checked, calls)


def test_copy_equals_stock_merge_for_every_type(pkg, host, sd_patcher):
    """A merged copy (copies.build) of a mixed stack of every type is ComfyUI's merged weight,
    and the layers' own weights are left as they were."""
    patcher = sd_patcher
    model = patcher.model
    chain = []
    for i, (kind, kw) in enumerate([("loha", {}), ("lora", {"dora": "out"}), ("oft", {}), ("lokr", {}),
                                    ("glora", {}), ("boft", {})]):
        sd = tiny_models.adapter_state_dict(kind, targets_for("sd", host, kind, kw), seed=20 + i, **kw)
        patches, plan = build(pkg, patcher, sd)
        chain.append((plan.layers, patches, 0.8 - 0.3 * i))
    paths = sorted(set().union(*(layers.keys() for layers, _, _ in chain)))
    original = {p: model.get_submodule(p).weight.detach().clone() for p in paths}
    for p in paths:
        module = model.get_submodule(p)
        layer_chain = tuple((layers[p], s) for layers, _, s in chain if p in layers)
        copy = pkg.copies.build(module, layer_chain, pkg.copies.CopyKey((), ()), module.weight.dtype,
                                module.weight.device)
        # each merged entry sums at most a row of the weight per adapter (DoRA's norm, GLoRA's
        # W a1; LoRA, LoHa and LoKr products and OFT's rotation blocks are shorter), and the
        # chain's differences; magnitude: the weight and each adapter's difference
        terms = stock_terms([(pt, s) for _, pt, s in chain], p + ".weight", original[p])
        tol = compare.tolerance(sum(t.abs() for t in terms), compare.reduction_length(original[p]) + len(terms),
                                original[p].dtype)
        ratio = compare.error_ratio(copy.weight, sum(terms), tol)
        assert ratio <= 1, (p, ratio)
    for p in paths:
        assert torch.equal(model.get_submodule(p).weight, original[p])


def test_move_layer_moves_every_form_and_counts_bytes(pkg, host, sd_patcher):
    """low_rank.move_layer moves every tensor a form holds (DoRA's core and magnitude, kron
    factors, rotations, the adapter inside ComfyUI's own merge) into an arena, each a view of its
    one buffer with the same values, and `nbytes` counts them."""
    patcher = sd_patcher
    for i, (kind, kw) in enumerate(CASES):
        if (kind, kw.get("variant")) == ("lokr", "tucker") and not comfy_merges_lokr_tucker():
            continue
        sd = tiny_models.adapter_state_dict(kind, targets_for("sd", host, kind, kw), seed=30 + i, **kw)
        _, plan = build(pkg, patcher, sd)
        for fs in plan.layers.values():
            before = sum(f.nbytes for f in fs)
            assert before > 0
            old = [t for f in fs for t in f_tensors(pkg, f)]  # kept alive: no storage is reused
            values = [t.clone() for t in old]
            ptrs = {t.untyped_storage().data_ptr() for t in old}
            cpu = torch.device("cpu")
            target = pkg.arena.Arena(pkg.low_rank.layer_tensors(fs), cpu)
            pkg.low_rank.move_layer(fs, target)
            after = [t for f in fs for t in f_tensors(pkg, f)]
            assert len(after) == len(old), kind
            assert not {t.untyped_storage().data_ptr() for t in after} & ptrs, kind  # every tensor moved
            assert all(torch.equal(a, v) for a, v in zip(after, values, strict=True)), kind
            assert {t.untyped_storage().data_ptr() for t in after} == {target.buffer.data_ptr()}, kind
            assert sum(f.nbytes for f in fs) == before
            assert all(str(f.device) == "cpu" for f in fs)


def f_tensors(pkg, f) -> list:
    if isinstance(f, pkg.low_rank.LayerFactors):
        return [t for t in (f.down, f.up, f.mid) if t is not None]
    return f.tensors()


def test_k_max_is_the_longest_sum_of_the_tiny_models(sd_patcher, flux_patcher):
    """compare.K_MAX, the sum length the workflows' tolerance counts with, is the longest dot
    product of a Linear or convolution in the tiny SD, Flux and CLIP models (attention sums run
    over at most 77 tokens or 64 channels)."""
    from lora_cache_testkit.harness import tiny_clip
    models = (sd_patcher.model, flux_patcher.model, tiny_clip().cond_stage_model)
    longest = max(compare.reduction_length(m.weight) for model in models for m in model.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)))
    assert longest == compare.K_MAX


def test_build_reasons_name_the_forms(pkg, host, sd_patcher):
    sd = tiny_models.adapter_state_dict("lokr", tiny_models.sd_targets(host.unet_sd), seed=3)
    _, plan = build(pkg, sd_patcher, sd)
    assert "lokr: kron factors on" in plan.form_note
    sd = tiny_models.adapter_state_dict("lora", tiny_models.sd_targets(host.unet_sd), seed=3, dora="out")
    _, plan = build(pkg, sd_patcher, sd)
    assert "dora (output channels) on" in plan.form_note
    sd = tiny_models.adapter_state_dict("lora", tiny_models.sd_targets(host.unet_sd), seed=3)
    _, plan = build(pkg, sd_patcher, sd)
    assert plan.form_note is None


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine runs it)")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(64, 64, None), (48, 144, 3), (96, 32, None)], ids=["square", "qkv", "narrow"])
def test_weight_and_output_updates_agree_in_half_precision(pkg, device, dtype, shape, monkeypatch):
    """The two per-call updates of a plain LoRA on a ComfyUI Linear in the model's own half
    precision, the weight update against the output update, within the rounding of the dtype:
    strengths 1, 0 and negative, two stacked adapters, one factor per output slice of a fused
    weight, batch sizes around the weight update's threshold."""
    import comfy.ops
    g = torch.Generator().manual_seed(sum(shape[:2]))
    K, N, slices = shape
    lin = comfy.ops.disable_weight_init.Linear(K, N, bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(N, K, generator=g) * K ** -0.5).to(dtype))
        lin.bias.copy_((torch.randn(N, generator=g) * 0.1).to(dtype))

    def adapter(seed):
        gg = torch.Generator().manual_seed(seed)
        parts = [(0, N)] if slices is None else [(i * N // slices, N // slices) for i in range(slices)]
        fs = []
        for start, length in parts:
            down = (torch.randn(K, 8, generator=gg) * K ** -0.5).to(device, dtype)
            up = (torch.randn(8, length, generator=gg) * 8 ** -0.5).to(device, dtype)
            fs.append(pkg.low_rank.LayerFactors("linear", down, up, 0.75,
                                                out_slice=None if slices is None else (start, length)))
        return tuple(fs)
    stacks = [[(adapter(1), 1.0)], [(adapter(2), 0.0)], [(adapter(3), -1.4), (adapter(4), 0.6)]]
    calls = count_weight_update(pkg, monkeypatch)
    real_plan = pkg.weight_update.as_weight_plan
    for stack in stacks:
        for rows in (1, 7, 300, 1031):
            x = torch.randn(rows, K, generator=g).to(device, dtype)
            outs = {}
            for update in ("weight", "output"):
                monkeypatch.setattr(pkg.weight_update, "as_weight_plan",
                                    real_plan if update == "weight" else (lambda p, w: None))
                pkg.layers.activate(lin, stack)
                try:
                    with torch.no_grad():
                        outs[update] = lin(x).double()
                finally:
                    pkg.layers.deactivate(lin)
            bound = x.double().abs() @ lin.weight.double().abs().t() + lin.bias.double().abs()
            for factors, s in stack:
                for f in factors:
                    d = abs(s * f.scale) * (x.double().abs() @ f.down.double().abs() @ f.up.double().abs())
                    if f.out_slice is None:
                        bound += d
                    else:
                        bound[:, f.out_slice[0]:sum(f.out_slice)] += d
            # both updates sum in float32 and round to the dtype at most 7 times together (the
            # weight update its merged weight and output; the output update its two partial products,
            # their scaling, the base output and the sum), each by at most eps / 2
            tol = compare.tolerance(bound, K + 1, dtype, accumulate=torch.float32, roundings=4)
            ratio = compare.error_ratio(outs["weight"], outs["output"], tol)
            assert ratio <= 1, (rows, ratio)
    assert calls and any(c == ("tiles" if slices else "whole") for c in calls), calls


def test_weight_update_only_through_comfy_stock_cast(pkg, monkeypatch):
    """ComfyUI ops classes with their own cast (scaled fp8, fp8 matmul) hand weight functions a
    weight in another scale or dtype, so the weight update stays off there: such a layer adds the
    update to its output, and its result is the one ComfyUI's own forward plus the update gives."""
    import comfy.ops

    class OwnCast(comfy.ops.manual_cast.Linear):
        def forward_comfy_cast_weights(self, input):  # another cast: the stored weight is W / 2
            weight, bias = comfy.ops.cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight * 2, bias)

    g = torch.Generator().manual_seed(3)
    calls = count_weight_update(pkg, monkeypatch)
    for cls, scale in ((comfy.ops.manual_cast.Linear, 1.0), (OwnCast, 2.0)):
        lin = cls(32, 32, bias=True)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(32, 32, generator=g) / 8)
            lin.bias.copy_(torch.randn(32, generator=g) / 8)
        down, up = torch.randn(32, 4, generator=g) / 6, torch.randn(4, 32, generator=g) / 2
        saved = lin.weight.detach().clone()
        pkg.layers.activate(lin, [((pkg.low_rank.LayerFactors("linear", down, up, 0.5),), 0.8)])
        try:
            x = torch.randn(512, 32, generator=g)
            calls.clear()
            with torch.no_grad():
                got = lin(x)
        finally:
            pkg.layers.deactivate(lin)
        assert torch.equal(lin.weight, saved), cls.__name__  # the layer's own weight is never written
        update = 0.4 * (down.double() @ up.double()).t()
        want, magnitude = compare.reference(torch.nn.functional.linear, x, [lin.weight * scale, update], lin.bias)
        ratio = compare.error_ratio(got, want, compare.tolerance(magnitude, 32 + 1, got.dtype))
        assert ratio <= 1, (cls.__name__, ratio)
        # ComfyUI's stock cast copies the weight for its weight functions: the update goes into that copy
        assert calls == (["in place"] if cls is comfy.ops.manual_cast.Linear else []), (cls.__name__, calls)



def test_arena_keeps_a_shared_down_projection_one_tensor(pkg, flux_patcher):
    """Flux's q/k/v factors on a fused weight share one down projection; moved into an arena it
    is still one tensor, every factor's down a view of its columns, the values the same, and the
    buffer holds each storage's bytes once (within the alignment of each span)."""
    _, plan = build(pkg, flux_patcher, tiny_models.flux_lora_state_dict(seed=4))
    layers = {p: fs for p, fs in plan.layers.items() if fs[0].shared_down is not None}
    assert layers, list(plan.layers)
    tensors = pkg.low_rank.tensors_of(layers.values())
    values = {id(t): t.clone() for t in tensors}
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    arena = pkg.arena.Arena(tensors, torch.device("cpu"))
    before = [(fs, [(f.down, f.up) for f in fs]) for fs in layers.values()]
    for fs in layers.values():
        pkg.low_rank.move_layer(fs, arena)
    assert held <= arena.nbytes < held + 256 * len(tensors)
    base = arena.buffer.data_ptr()
    for fs, old in before:
        shared = fs[0].shared_down
        assert shared.untyped_storage().data_ptr() == base
        for f, (down, up) in zip(fs, old, strict=True):
            assert f.shared_down is shared and f.down.data_ptr() == shared[:, f.shared_cols[0]:].data_ptr()
            assert torch.equal(f.down, values[id(down)]) and torch.equal(f.up, values[id(up)])
            assert f.up.untyped_storage().data_ptr() == base


def test_copy_layer_copies_a_layer_out_of_a_block(pkg, flux_patcher):
    """A layer's forms copied for a twin (low_rank.copy_layer) into an arena: new objects whose
    tensors are views of that arena alone, with the same values, and the originals, views of the
    entry's block, untouched."""
    _, plan = build(pkg, flux_patcher, tiny_models.flux_lora_state_dict(seed=5))
    everything = pkg.low_rank.tensors_of(plan.layers.values())
    block = pkg.arena.Arena(everything, torch.device("cpu"))
    for fs in plan.layers.values():
        pkg.low_rank.move_layer(fs, block)
    fs = next(fs for fs in plan.layers.values() if fs[0].shared_down is not None)
    originals = pkg.low_rank.layer_tensors(fs)
    place = pkg.arena.Arena(originals, torch.device("cpu"))
    copies = pkg.low_rank.copy_layer(fs, place)
    assert place.nbytes < block.nbytes / 4
    assert all(c is not f for c, f in zip(copies, fs, strict=True))
    got = pkg.low_rank.layer_tensors(copies)
    assert {t.untyped_storage().data_ptr() for t in got} == {place.buffer.data_ptr()}
    assert {t.untyped_storage().data_ptr() for t in pkg.low_rank.layer_tensors(fs)} == {block.buffer.data_ptr()}
    assert all(torch.equal(a, b) for a, b in zip(got, originals, strict=True))
    assert copies[0].down.data_ptr() == copies[0].shared_down.data_ptr()


def _pieces_hold(pkg, tensors: list, arena, piece: int) -> None:
    """Every tensor placed into `arena` keeps its values and is a view of one of its pieces,
    each a power of two of at most `piece` bytes (or of a tensor larger than that)."""
    values = [t.clone() for t in tensors]
    placed = [arena(t) for t in tensors]
    bases = {b.data_ptr(): b.numel() for b in arena.buffers}
    for b in arena.buffers:
        n = b.numel()
        assert n & (n - 1) == 0, n
    largest = max(t.untyped_storage().nbytes() for t in tensors)
    assert all(n <= max(piece, 2 * largest) for n in bases.values()), (sorted(bases.values()), piece)
    for t, v in zip(placed, values, strict=True):
        assert torch.equal(t, v)
        base = t.untyped_storage().data_ptr()
        assert base in bases
        lo = t.data_ptr() - base
        assert lo >= 0 and lo + t.numel() * t.element_size() <= bases[base]


def test_arena_in_pieces_holds_an_entry_in_powers_of_two(pkg, flux_patcher):
    """Host memory comes in pieces, page-locked ones powers of two (torch rounds each page-locked
    block up to one): an entry placed into pieces keeps every value, a shared down projection
    stays one tensor with its columns as views, the pieces together take little more than the
    entry's bytes, and the tensors are copied in a few runs per piece, not one by one."""
    _, plan = build(pkg, flux_patcher, tiny_models.flux_lora_state_dict(seed=6))
    block = pkg.arena.Arena(pkg.low_rank.tensors_of(plan.layers.values()), torch.device("cpu"))
    for fs in plan.layers.values():
        pkg.low_rank.move_layer(fs, block)  # as the entry is on its device: one block
    tensors = pkg.low_rank.tensors_of(plan.layers.values())
    held = block.nbytes
    piece = 8192
    # pageable host memory: pieces as large as what they hold
    pageable = pkg.arena.Arena(tensors, torch.device("cpu"), piece=piece)
    assert len(pageable.buffers) > 2 and pageable.nbytes <= held + 256 * len(pageable.buffers)
    pieces = pkg.arena.Arena(tensors, torch.device("cpu"), pin=True, piece=piece)
    assert len(pieces.buffers) > 2
    assert held <= pieces.nbytes < held + held // 4 + 2 * piece
    with tensor_copies() as copies:
        _pieces_hold(pkg, tensors, pieces, piece)
    # a run of neighbouring tensors is one copy: a few per piece, not one per tensor
    assert len(copies) <= 2 * len(pieces.buffers) and 4 * len(copies) < len(tensors), \
        (len(copies), len(pieces.buffers), len(tensors))
    # and back into one block from the pieces: one copy per run of each piece
    for fs in plan.layers.values():
        pkg.low_rank.move_layer(fs, pieces)
    shared = [fs for fs in plan.layers.values() if fs[0].shared_down is not None]
    assert shared
    for fs in shared:
        assert all(f.shared_down is fs[0].shared_down for f in fs)
        assert fs[0].down.data_ptr() == fs[0].shared_down.data_ptr()
    back = pkg.arena.Arena(pkg.low_rank.tensors_of(plan.layers.values()), torch.device("cpu"))
    for fs in plan.layers.values():
        pkg.low_rank.move_layer(fs, back)
    assert len({t.untyped_storage().data_ptr() for t in pkg.low_rank.tensors_of(plan.layers.values())}) == 1


def test_arena_gives_a_tensor_larger_than_a_piece_its_own(pkg):
    """A tensor larger than a piece (a dense update) gets a piece of its own, rounded up to a
    power of two; the small tensors around it share pieces."""
    small = [torch.randn(16, 8) for _ in range(6)]
    large = torch.randn(64, 64)  # 16 KiB
    tensors = [*small[:3], large, *small[3:]]
    piece = 4096
    arena = pkg.arena.Arena(tensors, torch.device("cpu"), pin=True, piece=piece)
    _pieces_hold(pkg, tensors, arena, piece)
    assert sorted(b.numel() for b in arena.buffers)[-1] == 16384
    assert len(arena.buffers) <= 4
    # a small adapter takes one piece, its size rounded up to a power of two, not a whole piece
    few = pkg.arena.Arena(small, torch.device("cpu"), pin=True, piece=pkg.arena.PIECE)
    _pieces_hold(pkg, small, few, pkg.arena.PIECE)
    assert [b.numel() for b in few.buffers] == [4096]


def test_arena_queues_copies_only_when_asked_and_holds_their_sources(pkg):
    """Copies are asynchronous only with `non_blocking` (the memory owner asks for it where
    ComfyUI copies so: CUDA, not MPS, XPU, DirectML or --deterministic), and each source storage
    lives as long as the arena, past the tensors that moved away from it: a queued copy may still
    read it until the caller's one wait."""
    for queued in (False, True):
        sources = [torch.randn(64, 8) for _ in range(3)]
        held = [weakref.ref(t.untyped_storage()) for t in sources]
        values = [t.clone() for t in sources]
        arena = pkg.arena.Arena(sources, torch.device("cpu"), non_blocking=queued)
        with tensor_copies() as seen:
            moved = [arena(t) for t in sources]
        assert seen and set(seen) == {queued}, (queued, seen)
        del sources
        assert all(ref() is not None for ref in held)
        del arena
        assert all(ref() is None for ref in held)
        assert all(torch.equal(m, v) for m, v in zip(moved, values, strict=True))


def test_arena_keeps_overlapping_views_one_copy_across_pieces(pkg):
    """Views that overlap in their source stay views of one copy, also where the tensor after
    them starts a new piece: a tensor `b` over the last element of `a`, and `c` right after `a`
    in the same storage, not at a multiple of 16 bytes."""
    raw = torch.arange(140, dtype=torch.uint8)
    a = torch.empty(0, dtype=torch.float32).set_(raw.untyped_storage(), 0, (10,))  # bytes 0-40
    b = a[9:]  # bytes 36-40
    c = torch.empty(0, dtype=torch.float32).set_(raw.untyped_storage(), 10, (25,))  # bytes 40-140
    arena = pkg.arena.Arena([a, b, c], torch.device("cpu"), pin=True, piece=64)
    pa, pb, pc = arena(a), arena(b), arena(c)
    assert torch.equal(pa, a) and torch.equal(pb, b) and torch.equal(pc, c)
    assert pb.data_ptr() == pa[9:].data_ptr()


def test_arena_takes_one_block_where_pieces_would_take_more(pkg):
    """Tensors too large to share a piece would leave every piece part empty: one block, its
    size rounded up to a power of two as torch's page-locked allocator does, takes less."""
    tensors = [torch.randn(640) for _ in range(5)]  # 2560 bytes each: one per 4096-byte piece
    arena = pkg.arena.Arena(tensors, torch.device("cpu"), pin=True, piece=4096)
    assert [b.numel() for b in arena.buffers] == [16384]
    _pieces_hold(pkg, tensors, arena, 16384)
