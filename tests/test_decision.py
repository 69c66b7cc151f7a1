"""The path decision on its own: decide() is a pure function of the facts the node gathered, so
each rule is checked here from facts alone (the workflows in the other tests check that the node
gathers them from the real ComfyUI)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def d(host):
    from lora_cache_loader.lora_cache import decision
    return decision


def facts(d, **kw):
    base = dict(side="model", mode="auto", found="cached", layer_count=30, nbytes=4096, device="cuda:0")
    return d.Facts(**{**base, **kw})


def test_cached_and_ready_is_fast(d):
    out = d.decide(facts(d))
    assert (out.path, out.via, out.reattach) == ("fast", "cache", False)
    auto = "at sampling: merged copies where they fit, the rest unmerged"
    assert out.reason == f"cached adapter, nothing built or moved; {auto}"
    assert d.decide(facts(d, change="strength 1->0.6")).reason.endswith("; strength 1->0.6")
    assert d.decide(facts(d, mode="unmerged")).reason == "cached adapter, nothing built or moved; at sampling: unmerged"
    assert d.decide(facts(d, side="clip")).reason == "cached adapter, nothing built or moved; at encoding: unmerged"


def test_new_entry_is_a_build_that_says_why(d):
    out = d.decide(facts(d, found="first use"))
    assert (out.path, out.via) == ("build", "cache")
    assert out.reason == "first use: 30 layers, 4 KiB on cuda:0; at sampling: merged copies where they fit, the rest " \
                         "unmerged"


@pytest.mark.parametrize("problem", ["attach_problem", "merged_problem"])
def test_cached_but_not_ready_reattaches(d, problem):
    out = d.decide(facts(d, change="switch a->b", **{problem: "layer x no longer holds the cached factors"}))
    assert (out.path, out.via, out.reattach) == ("build", "cache", True)
    assert out.reason == "cached factors reused, but layer x no longer holds the cached factors; switch a->b"


@pytest.mark.parametrize("problem", ["adapter_problem", "host_problem", "placement_problem"])
def test_what_rules_out_the_cache_takes_comfyuis_patch_path(d, problem):
    for mode in ("auto", "unmerged", "merged"):
        out = d.decide(facts(d, mode=mode, **{problem: "some reason"}))
        assert (out.path, out.via) == ("full", "comfy")
        assert out.reason == "some reason; ComfyUI patch path"


def test_first_problem_wins_in_a_fixed_order(d):
    out = d.decide(facts(d, adapter_problem="a", host_problem="h", placement_problem="p", attach_problem="x"))
    assert out.reason == "a; ComfyUI patch path"
    out = d.decide(facts(d, host_problem="h", placement_problem="p"))
    assert out.reason == "h; ComfyUI patch path"


def test_merged_mode(d):
    """Merged mode is the cached path, under dynamic VRAM too: each sampling runs merged copies of
    the layers (copies.py) and nothing is merged into ComfyUI's weights; the text encoder's is
    ComfyUI's patch path."""
    out = d.decide(facts(d, mode="merged"))
    assert (out.path, out.via) == ("fast", "cache")
    assert out.reason == "cached adapter, nothing built or moved; at sampling: merged copies wherever they fit"
    built = d.decide(facts(d, mode="merged", found="first use"))
    assert built.path == "build" and built.reason.endswith("; at sampling: merged copies wherever they fit")
    clip = d.decide(facts(d, side="clip", mode="merged"))
    assert (clip.path, clip.via, clip.reason) == ("full", "comfy", "mode merged; ComfyUI patch path")


def test_no_keys_for_a_side_is_off(d):
    out = d.decide(facts(d, side="clip", has_patches=False, host_problem="h"))
    assert (out.path, out.via, out.reason) == ("off", "none", "no LoRA keys for the text encoder")


def test_decide_reads_nothing_but_its_facts(d):
    f = facts(d, found="first use")
    assert d.decide(f) == d.decide(f)
    with pytest.raises(ValueError, match="unknown path 'sometimes'"):
        d.Decision("sometimes", "no such path")


def test_mode_values_and_the_former_name(d):
    """The modes, and "dynamic", the unmerged mode's former value, which saved workflows carry."""
    assert d.MODES == ("auto", "merged", "unmerged")
    assert [d.mode_of(m) for m in ("auto", "merged", "unmerged", "dynamic")] == ["auto", "merged", "unmerged",
                                                                                  "unmerged"]
    assert d.mode_of("fastest") is None
