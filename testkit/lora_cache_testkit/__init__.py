"""What the tests, the demo, the GPU checks and the benchmark share: the real ComfyUI host
(`host`), tiny generated models (`tiny_models`), a ComfyUI server process (`server`), the
in-process harness (`harness`) and its prompts (`workflows`), spies and comparisons.

This folder (`testkit/`) is on sys.path through a .pth file that scripts/setup_host.sh and
scripts/setup_current_host.sh put into the host venvs; elsewhere run with PYTHONPATH=testkit.
The repository root itself never goes on sys.path: its `nodes/` would shadow ComfyUI's `nodes`.

Our package's own modules are imported as `lora_cache_loader.lora_cache.<module>` once ComfyUI
loaded it (see host.load_package)."""
