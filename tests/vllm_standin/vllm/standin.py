"""Telemetry of the stand-in (not part of vLLM): every engine started in this process, for tests.

Tests run safemerge in a subprocess; with ``VLLM_STANDIN_LOG`` set, the log is written there at exit and
after every generate() call and shutdown, so a killed process still leaves it."""

import atexit
import json
import os

ENGINES: list = []  # every LLM started in this process, shut down or not


def records() -> list[dict]:
    return [{"model": e.model, "enable_lora": e.enable_lora, "gpu_memory_utilization": e.gpu_memory_utilization,
             "closed": e.closed, "calls": e.calls} for e in ENGINES]


def dump(path) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records(), f, indent=1)
    os.replace(tmp, path)  # readers never see half a file


def autodump() -> None:
    if os.environ.get("VLLM_STANDIN_LOG"):
        dump(os.environ["VLLM_STANDIN_LOG"])


if os.environ.get("VLLM_STANDIN_LOG"):
    atexit.register(autodump)
