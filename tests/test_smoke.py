import torch

import workflows as wf
from harness import tiny_models


def test_smoke(host):
    tiny_models.write_lora(host.loras / "a.safetensors", tiny_models.sd_lora_state_dict(host.unet_sd, seed=1))
    host.new_executor()
    base = host.run(wf.sd([]))["out"]
    out = host.run(wf.sd([wf.ours("a.safetensors")]))["out"]
    print(host.last_event())
    ref = host.run(wf.sd([wf.stock("a.safetensors")]))["out"]
    print((out - ref).abs().max(), (out - base).abs().max())
    out2 = host.run(wf.sd([wf.ours("a.safetensors")]))["out"]
    print(host.events()[-1])
