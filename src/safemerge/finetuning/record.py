"""What a fine-tune writes beside its weights: the adapter or model, and training_log.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections import Counter
from dataclasses import asdict, is_dataclass
from enum import Enum
from pathlib import Path

import torch

from safemerge.checkpoints.lora import with_sorted_sets
from safemerge.finetuning.settings import FinetuneResult, Settings, base_spec
from safemerge.finetuning.trainer import numerics, supported

LOG_FILE = "training_log.json"


def save(trainer, tokenizer, directory: Path, spec: str, full_dtype: torch.dtype | None) -> None:
    """The adapter (naming its base as the user gave it), or the full model in FULL_DTYPE, with the tokenizer."""
    model = trainer.model
    if full_dtype is None:
        model.peft_config["default"].base_model_name_or_path = spec
    else:  # trained in float32; written as the base was (a bfloat16 model is not doubled in size)
        model = model.to(full_dtype)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if full_dtype is None:  # the same adapter_config.json bytes in every run (PEFT writes target_modules from a set)
        config = directory / "adapter_config.json"
        config.write_text(json.dumps(with_sorted_sets(json.loads(config.read_text())), indent=2, sort_keys=True) + "\n")


def full_checkpoint_dtype(base: Path, s: Settings) -> torch.dtype | None:
    """The dtype a --full fine-tune is written in: --dtype, or the base checkpoint's most common float dtype."""
    if not s.full:
        return None
    if s.dtype != "auto":
        return getattr(torch, s.dtype)
    from safemerge.checkpoints.readers import open_checkpoint

    found = Counter(i.dtype for i in open_checkpoint(base, str(base), allow_pickle=False).infos.values()
                    if i.dtype.is_floating_point)
    return found.most_common(1)[0][0] if found else torch.float32


def training_history(trainer) -> list[dict]:
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm", "mean_token_accuracy")
    return [{k: e[k] for k in keep if k in e} for e in trainer.state.log_history if "loss" in e]


def training_record(result: FinetuneResult, s: Settings, history: list[dict], summary, model: str, data: Path,
                    trainer) -> dict:
    """training_log.json: what was trained on what, every setting, every logged step, versions."""
    return {
        "model": base_spec(model),
        "data": os.path.abspath(data),
        "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
        "kind": "full" if s.full else "lora",
        "settings": asdict(s),
        "trainer_settings": trainer_settings(trainer, s),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "result": {**asdict(result), "out": str(result.out), "global_batch_size": result.processes * s.batch_size,
                   "mean_train_loss": summary.training_loss,
                   "seconds_per_step": summary.metrics.get("train_runtime", 0.0) / max(1, result.steps)},
        "log": history,
        "versions": versions(),
    }


def trainer_settings(trainer, s: Settings) -> dict:
    """The fields of ``numerics`` as the Trainer holds them after the run, and what they resolved to:
    the run's steps, warm-up steps, processes and the mixed precision accelerate applied."""
    def plain(value):  # enums and AcceleratorConfig as JSON
        return value.value if isinstance(value, Enum) else asdict(value) if is_dataclass(value) else value

    args = trainer.args
    pinned = {name: plain(getattr(args, name)) for name in supported(type(args), numerics(s.device, s))}
    steps = trainer.state.max_steps
    return {**pinned, "steps": steps, "warmup_steps": args.get_warmup_steps(steps), "logging_steps": args.logging_steps,
            "processes": args.world_size, "mixed_precision": getattr(args, "mixed_precision", None)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("safemerge", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
