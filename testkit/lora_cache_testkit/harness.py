"""The real ComfyUI host, in-process, for the tests: ComfyUI's own node loading (our package
comes in through custom_nodes/ like any user's), its PromptExecutor, tiny generated models.

A few test-only nodes are added: sinks that keep a run's latent/conditioning for comparison,
a tiny CLIP built from ComfyUI's SD1 CLIP classes, and a tiny Flux model with conditioning.
"""
from __future__ import annotations

import asyncio
import functools
import uuid
from pathlib import Path

from . import host

host.boot()

import torch

from . import tiny_models

SINK: dict[str, object] = {}


class MessageLog:
    """What PromptExecutor sends to its server: here kept for the tests to read."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class LatentSink:
    OUTPUT_NODE = True
    CATEGORY = "_test"
    FUNCTION = "keep"
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "tag": ("STRING", {"default": "out"})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # always hand over the (possibly cached) input

    def keep(self, samples, tag):
        SINK[tag] = samples["samples"].clone()
        return {}


class CondSink(LatentSink):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "tag": ("STRING", {"default": "cond"})}}

    def keep(self, conditioning, tag):
        SINK[tag] = (conditioning[0][0].clone(), conditioning[0][1].get("pooled_output"))
        return {}


TINY_CLIP_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                    "num_hidden_layers": 2, "projection_dim": 64}


@functools.lru_cache(maxsize=1)
def tiny_clip():
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    # fp32 weights: stock rounds its merged weights to the weights' dtype, the cached path does
    # not, so with fp16 weights the two differ by fp16 rounding (about 1e-3), not by our error.
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_CLIP_CONFIG),
                                                "dtype": torch.float32})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return clip


class TinyClipLoader:
    CATEGORY = "_test"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (tiny_clip(),)


@functools.lru_cache(maxsize=1)
def tiny_flux():
    return tiny_models.flux_patcher()


class TinyFluxLoader(TinyClipLoader):
    RETURN_TYPES = ("MODEL",)

    def load(self):
        return (tiny_flux(),)


class TinyFluxConditioning(TinyClipLoader):
    RETURN_TYPES = ("CONDITIONING",)

    def load(self):
        g = torch.Generator().manual_seed(11)
        ctx = torch.randn(1, 8, tiny_models.FLUX_CONFIG["context_in_dim"], generator=g)
        pooled = torch.randn(1, tiny_models.FLUX_CONFIG["vec_in_dim"], generator=g)
        return ([[ctx, {"pooled_output": pooled, "guidance": 3.5}]],)


TEST_NODES = {
    "LCTestLatentSink": LatentSink,
    "LCTestCondSink": CondSink,
    "LCTestTinyClip": TinyClipLoader,
    "LCTestTinyFlux": TinyFluxLoader,
    "LCTestFluxCond": TinyFluxConditioning,
}


class Host:
    """One in-process ComfyUI with our package loaded through custom_nodes/."""

    def __init__(self, base: Path):
        import folder_paths

        self.base = base
        self.loras = base / "loras"
        self.unets = base / "diffusion_models"
        self.loras.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path("loras", str(self.loras), is_default=True)
        folder_paths.add_model_folder_path("diffusion_models", str(self.unets), is_default=True)
        folder_paths.set_output_directory(str(base / "output"))

        # ComfyUI's own custom_nodes/ may link another checkout of the package: the tests load
        # the checkout they belong to (host.ROOT), from a custom_nodes folder of their own.
        custom = base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        (custom / host.PACKAGE).symlink_to(host.ROOT, target_is_directory=True)
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())

        import execution
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_api_nodes=False))
        nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
        self.nodes = nodes
        self.execution = execution
        # ComfyUI loaded our package from custom_nodes/ under a name of its making; from here on
        # it imports as lora_cache_loader too (see host.load_package).
        node = nodes.NODE_CLASS_MAPPINGS["LoraCacheLoader"]
        self.lc = host.load_package(loaded_as=node.__module__.rsplit(".nodes.", 1)[0]).lora_cache
        self.server = MessageLog()
        self.new_executor()

        unet_sd = tiny_models.sd_unet_state_dict(seed=0)
        self.unet_sd = {k: v.half().float() for k, v in unet_sd.items()}
        tiny_models.write_sd_unet(self.unets / "tiny_sd.safetensors", seed=0)

    def sd_loras(self, specs: dict[str, tuple[int, tuple[str, ...]]]) -> dict[str, str]:
        """LoRA files for the tiny SD model in the loras folder: name -> (seed, layer kinds as
        tiny_models.sd_lora_state_dict takes them); returns name -> file name."""
        for name, (seed, kinds) in specs.items():
            tiny_models.write_lora(self.loras / f"{name}.safetensors",
                                   tiny_models.sd_lora_state_dict(self.unet_sd, seed=seed, kinds=kinds))
        return {name: f"{name}.safetensors" for name in specs}

    def flux_lora(self, name: str, seed: int) -> str:
        """A LoRA file for the tiny Flux model in the loras folder; its file name."""
        tiny_models.write_lora(self.loras / f"{name}.safetensors", tiny_models.flux_lora_state_dict(seed=seed))
        return f"{name}.safetensors"

    def new_executor(self):
        self.executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC,
                                                         cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def validate(self, prompt: dict) -> list[str]:
        valid = asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt invalid: {valid[1]} {valid[3]}")
        return valid[2]

    def run(self, prompt: dict, expect_error: bool = False, outputs: list[str] | None = None) -> dict:
        """Validates and executes an API-format prompt like the server does; returns the sinks.
        With `outputs` given, the prompt counts as validated already (as if a file changed
        between the server's validation and the execution)."""
        SINK.clear()
        pid = str(uuid.uuid4())
        if outputs is None:
            outputs = self.validate(prompt)
        self.server.messages.clear()
        self.executor.execute(prompt, pid, {}, outputs)
        if expect_error:
            assert not self.executor.success, "expected the prompt to fail"
            return self.error()
        if not self.executor.success:
            raise AssertionError(f"prompt failed: {self.error()}")
        return dict(SINK)

    def error(self) -> dict:
        for event, data in self.executor.status_messages:
            if event == "execution_error":
                return data
        return {}

    def events(self) -> list[dict]:
        return self.lc.stats()["events"]

    def last_event(self) -> dict:
        return self.events()[-1]
