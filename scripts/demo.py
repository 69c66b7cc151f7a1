"""The main job (scripts/demo.sh): a real ComfyUI server with this package, a generated tiny
model and two LoRA files, and a short series of queue runs toggling and switching adapters.
The series lives in lora_cache_testkit.demo, which the server tests share."""
import sys

from lora_cache_testkit.demo import main

if __name__ == "__main__":
    sys.exit(main())
