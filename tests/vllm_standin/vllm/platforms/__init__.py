"""vllm.platforms.current_platform: the stand-in runs on the CPU."""

from types import SimpleNamespace

current_platform = SimpleNamespace(device_type="cpu")
