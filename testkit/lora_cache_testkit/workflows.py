"""API-format prompts for the tests: UNETLoader -> LoRA node(s) -> KSampler -> sink."""
from __future__ import annotations

OURS = "LoraCacheLoaderModelOnly"
STOCK = "LoraLoaderModelOnly"


def ours(lora: str, strength: float = 1.0, enabled: bool = True, mode: str = "auto") -> tuple[str, dict]:
    return OURS, {"lora_name": lora, "strength_model": strength, "enabled": enabled, "mode": mode}


def stock(lora: str, strength: float = 1.0) -> tuple[str, dict]:
    return STOCK, {"lora_name": lora, "strength_model": strength}


def _sampler(model_ref, pos_ref, latent_ref, seed: int, steps: int = 2) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model_ref, "seed": seed, "steps": steps, "cfg": 1.5, "sampler_name": "euler",
        "scheduler": "normal", "positive": pos_ref, "negative": pos_ref, "latent_image": latent_ref,
        "denoise": 1.0}}


def sd(loras: list[tuple[str, dict]], seed: int = 42, base_branch: bool = False, model: str = "sd") -> dict:
    """A prompt; each LoRA node chains onto the previous one's model.

    base_branch adds a second KSampler fed by the loader's model directly (no adapter)."""
    if model == "sd":
        p = {"1": {"class_type": "UNETLoader",
                   "inputs": {"unet_name": "tiny_sd.safetensors", "weight_dtype": "default"}},
             "2": {"class_type": "LotusConditioning", "inputs": {}},
             "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    else:  # flux
        p = {"1": {"class_type": "LCTestTinyFlux", "inputs": {}},
             "2": {"class_type": "LCTestFluxCond", "inputs": {}},
             "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}}
    model_ref = ["1", 0]
    for i, (cls, inputs) in enumerate(loras):
        nid = f"l{i}"
        p[nid] = {"class_type": cls, "inputs": {"model": model_ref, **inputs}}
        model_ref = [nid, 0]
    p["5"] = _sampler(model_ref, ["2", 0], ["3", 0], seed)
    p["6"] = {"class_type": "LCTestLatentSink", "inputs": {"samples": ["5", 0], "tag": "out"}}
    if base_branch:
        p["7"] = _sampler(["1", 0], ["2", 0], ["3", 0], seed)
        p["8"] = {"class_type": "LCTestLatentSink", "inputs": {"samples": ["7", 0], "tag": "base"}}
    return p


def clip(cls: str, inputs: dict, text: str = "a tiny test prompt", seed: int = 42) -> dict:
    """Model and CLIP through one LoRA node (ours: LoraCacheLoader, stock: LoraLoader)."""
    p = sd([], seed)
    p["c"] = {"class_type": "LCTestTinyClip", "inputs": {}}
    p["l0"] = {"class_type": cls, "inputs": {"model": ["1", 0], "clip": ["c", 0], **inputs}}
    p["5"]["inputs"]["model"] = ["l0", 0]
    p["t"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["l0", 1], "text": text}}
    p["9"] = {"class_type": "LCTestCondSink", "inputs": {"conditioning": ["t", 0], "tag": "cond"}}
    return p


def paired(rows: list[tuple[str, float, bool]], seed: int = 42, node: str = OURS,
           stock_names: dict[str, str] | None = None, mode: str = "auto") -> dict:
    """Our chain on tiny_sd and the equivalent stock chain on tiny_sd_ref (the same weights, a
    separate model object) in one prompt, so stock's re-patching never touches our model.
    Each row is (lora, strength, enabled); a disabled row is a stock node at strength 0.

    The stock LoraLoader has no change check: after a file is rewritten under the same name,
    ComfyUI reuses its cached output (and the node its cached tensors). So a reference for a
    rewritten file reads a copy under another name: `stock_names` maps ours to the stock one."""
    p = sd([(node, {"lora_name": lora, "strength_model": s, "enabled": on, "mode": mode})
            for lora, s, on in rows], seed)
    p["r1"] = {"class_type": "UNETLoader",
               "inputs": {"unet_name": "tiny_sd_ref.safetensors", "weight_dtype": "default"}}
    ref = ["r1", 0]
    for i, (lora, s, on) in enumerate(rows):
        stock_lora = (stock_names or {}).get(lora, lora)
        p[f"s{i}"] = {"class_type": STOCK,
                      "inputs": {"model": ref, "lora_name": stock_lora, "strength_model": s if on else 0.0}}
        ref = [f"s{i}", 0]
    p["r5"] = _sampler(ref, ["2", 0], ["3", 0], seed)
    p["r6"] = {"class_type": "LCTestLatentSink", "inputs": {"samples": ["r5", 0], "tag": "ref"}}
    return p


def stack_node(rows: list[tuple[str, float, bool]], seed: int = 42, mode: str = "auto") -> dict:
    """One LoRA Cache Stack node carrying `rows` (padded with unused rows)."""
    p = sd([], seed)
    inputs: dict = {"model": ["1", 0], "mode": mode}
    for i in range(4):
        lora, s, on = rows[i] if i < len(rows) else ("None", 1.0, True)
        inputs.update({f"lora_{i + 1}": lora, f"strength_{i + 1}": s, f"enabled_{i + 1}": on})
    p["st"] = {"class_type": "LoraCacheStack", "inputs": inputs}
    p["5"]["inputs"]["model"] = ["st", 0]
    return p
