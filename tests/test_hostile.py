"""Hostile input: names that escape the loras folders, pickles that would run code,
malformed safetensors headers, absurd ranks and shapes. Every case is a node error naming the
LoRA, nothing is cached, no file is written, and the next good run still equals stock."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit import workflows as wf
from lora_cache_testkit.compare import close


@pytest.fixture(scope="module")
def good(host):
    name = "hostile_good.safetensors"
    tiny_models.write_lora(host.loras / name, tiny_models.sd_lora_state_dict(host.unet_sd, seed=41))
    return name



def node_error(h, prompt, outputs=None) -> str:
    err = h.run(prompt, expect_error=True, outputs=outputs)
    assert err.get("node_type") == wf.OURS, err
    return err["exception_message"]


def nothing_cached_for(h, name: str) -> bool:
    return not [e for e in h.lc.STORE.entries() if e.lora == name or os.path.basename(e.identity.path) == name]


def still_serves(h, good: str) -> None:
    """The next good run works and equals the stock loader's output."""
    out = h.run(wf.sd([wf.ours(good, 0.8)]))["out"]
    stock = h.run(wf.sd([wf.stock(good, 0.8)]))["out"]
    assert close(out, stock)


def test_names_escaping_the_loras_folders_are_refused(fresh, good):
    h = fresh
    outside = h.base / "outside"
    outside.mkdir(exist_ok=True)
    secret = tiny_models.write_lora(outside / "secret.safetensors",
                                    tiny_models.sd_lora_state_dict(h.unet_sd, seed=42))
    link = h.loras / "link_out.safetensors"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(secret)
    inner = h.loras / "link_in.safetensors"
    if inner.is_symlink() or inner.exists():
        inner.unlink()
    inner.symlink_to(h.loras / good)  # a symlink that stays inside the folders is fine

    cases = {
        f"../{good}": "contains '..'",  # ComfyUI alone would re-root this onto loras/<good>
        f"sub/../../{good}": "contains '..'",
        str(secret): "is an absolute path",
        str(h.loras / good): "is an absolute path",
        "link_out.safetensors": "outside every loras folder",
    }
    for name, why in cases.items():
        prompt = wf.sd([wf.ours(name)])
        if name != "link_out.safetensors":
            # The server's own validation refuses names not in the list before any node runs;
            # skipping it (outputs given) shows the node refuses them too.
            with pytest.raises(AssertionError, match="prompt invalid"):
                h.validate(prompt)
            outputs = ["6"]
        else:
            outputs = h.validate(prompt)  # ComfyUI lists symlinks: only the node can refuse it
        msg = node_error(h, prompt, outputs)
        assert name in msg and why in msg and "refused" in msg, msg
        assert nothing_cached_for(h, name) and nothing_cached_for(h, "secret.safetensors")
        with pytest.raises(h.lc.LoraCacheError, match="refused"):
            h.lc.apply(object(), None, name, 1.0, 0.0)
    assert h.lc.fingerprint(f"../{good}", True) != h.lc.fingerprint(f"../{good}", True)  # NaN: always re-run

    out = h.run(wf.sd([wf.ours("link_in.safetensors", 0.8)]))["out"]
    assert h.last_event()["path"] == "build"
    assert close(out, h.run(wf.sd([wf.stock(good, 0.8)]))["out"])
    still_serves(h, good)


class _WritesMarker:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("ext", ["pt", "ckpt"])
def test_pickle_payload_is_not_executed(fresh, good, tmp_path, ext):
    h = fresh
    marker = tmp_path / "pwned"
    name = f"evil.{ext}"
    sd = tiny_models.sd_lora_state_dict(h.unet_sd, seed=43)
    sd["payload"] = _WritesMarker(str(marker))
    torch.save(sd, h.loras / name)

    # The payload is live: an unsafe load of a copy does run it.
    probe = tmp_path / "probe_marker"
    torch.save({"payload": _WritesMarker(str(probe))}, tmp_path / f"copy.{ext}")
    torch.load(tmp_path / f"copy.{ext}", weights_only=False)
    assert probe.exists()

    msg = node_error(h, wf.sd([wf.ours(name)]))
    assert name in msg and "could not be loaded" in msg and "safe loading refuses" in msg, msg
    assert ("(io.open)" in msg or "(builtins.open)" in msg) and "two options" not in msg
    assert not marker.exists()
    assert nothing_cached_for(h, name)
    still_serves(h, good)


def test_plain_torch_file_loads_safely_and_matches_stock(fresh):
    h = fresh
    name = "plain.pt"
    torch.save(tiny_models.sd_lora_state_dict(h.unet_sd, seed=44), h.loras / name)
    out = h.run(wf.sd([wf.ours(name)]))["out"]
    assert h.last_event()["path"] == "build"
    assert close(out, h.run(wf.sd([wf.stock(name)]))["out"])


def _raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def _with_rank(unet_sd: dict, rank: int) -> dict:
    sd = tiny_models.sd_lora_state_dict(unet_sd, seed=45)
    k = next(k for k in sd if k.endswith(".lora_down.weight") and "attn1_to_q" in k)
    base = k[: -len(".lora_down.weight")]
    up = sd[base + ".lora_up.weight"]
    down = sd[base + ".lora_down.weight"]
    g = torch.Generator().manual_seed(3)
    sd[base + ".lora_up.weight"] = (0.01 * torch.randn(up.shape[0], rank, generator=g)).half()
    sd[base + ".lora_down.weight"] = (0.01 * torch.randn(rank, down.shape[1], generator=g)).half()
    return sd


def test_malformed_headers_absurd_ranks_and_shapes(fresh, good):
    h = fresh
    files = {
        # an 8-byte length that claims a header of 2**60 bytes
        "huge_header.safetensors": (_raw_safetensors(b"{}", length=1 << 60), "could not be loaded"),
        "bad_json.safetensors": (_raw_safetensors(b"{not json at all}"), "could not be loaded"),
        # a header claiming a 2**20 x 2**20 fp16 tensor (2 TiB) over 16 bytes of data
        "huge_shape.safetensors": (_raw_safetensors(
            {"lora_unet_x.lora_up.weight": {"dtype": "F16", "shape": [1 << 20, 1 << 20],
                                            "data_offsets": [0, 1 << 41]}}, b"\0" * 16), "could not be loaded"),
        # offsets that do not match the shape
        "bad_offsets.safetensors": (_raw_safetensors(
            {"lora_unet_x.lora_up.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}},
            b"\0" * 8), "could not be loaded"),
        "empty.safetensors": (b"", "could not be loaded"),
    }
    for name, (blob, _) in files.items():
        (h.loras / name).write_bytes(blob)
    # 320x320 layer with a rank-400 pair: shapes chain, but it is not a low-rank adapter
    tiny_models.write_lora(h.loras / "rank400.safetensors", _with_rank(h.unet_sd, 400))
    files["rank400.safetensors"] = (None, "has rank 400")
    bad = tiny_models.sd_lora_state_dict(h.unet_sd, seed=46)
    k = next(k for k in bad if k.endswith("lora_down.weight"))
    bad[k] = torch.ones(bad[k].shape[0], bad[k].shape[1] + 1).half()
    tiny_models.write_lora(h.loras / "mismatch.safetensors", bad)
    files["mismatch.safetensors"] = (None, "factors make")

    for name, (_, text) in files.items():
        msg = node_error(h, wf.sd([wf.ours(name)]))
        assert name in msg and text in msg, (name, msg)
        assert nothing_cached_for(h, name), name
    still_serves(h, good)
    # a sane high rank (the layer's full 320) is accepted and equals stock
    tiny_models.write_lora(h.loras / "rank320.safetensors", _with_rank(h.unet_sd, 320))
    out = h.run(wf.sd([wf.ours("rank320.safetensors")]))["out"]
    assert h.last_event()["path"] == "build"
    assert close(out, h.run(wf.sd([wf.stock("rank320.safetensors")]))["out"])
