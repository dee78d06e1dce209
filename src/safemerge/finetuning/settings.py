"""A fine-tune's settings, checked, and its result."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from safemerge.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Every training option but the model, the data and the output (see ``finetune``)."""

    val_fraction: float = 0.1
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the decoder blocks' linear layers, found in the model
    lr: float = 1e-4
    epochs: float = 3
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 1024
    full: bool = False
    dtype: str = "auto"  # of a --full checkpoint: auto keeps the base model's (bfloat16 stays bfloat16)
    warmup_ratio: float = 0.1
    device: str = "auto"
    progress: bool = True
    logging_steps: int | None = None

    def check(self) -> None:
        rules = [
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (self.lora_alpha > 0, "--lora-alpha must be positive"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.lr > 0, "--lr must be positive"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.max_length >= 1, "--max-length must be at least 1"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.logging_steps is None or self.logging_steps >= 1, "--logging-steps must be at least 1"),
            (not (self.full and self.target_modules), "target_modules applies to LoRA only; drop it or --full"),
            (self.dtype in ("auto", "bfloat16", "float16", "float32"), "--dtype is auto, bfloat16, float16 or float32"),
            (self.full or self.dtype == "auto", "--dtype applies to a --full checkpoint; an adapter keeps PEFT's"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    train_examples: int
    val_examples: int
    steps: int
    train_loss: float | None  # mean loss of the last logged steps
    val_loss_before: float | None  # None without a validation split
    val_loss_after: float | None
    seconds: float
    processes: int = 1  # data-parallel processes (accelerate launch / torchrun); the global batch is processes × batch size
    published: bool = True  # False in every process but the main one, which alone writes OUT


def base_spec(model: str) -> str:
    """The model as the adapter should name it: an absolute path when local, else the Hub id."""
    path = Path(model).expanduser()
    return os.path.abspath(path) if path.exists() else model
