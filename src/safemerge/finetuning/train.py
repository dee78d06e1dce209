"""`safemerge finetune`: supervised fine-tuning of a chat model on the user's task, with LoRA
(default) or all weights, through TRL's SFTTrainer and peft.

Every row of the JSONL data becomes TRL's conversational prompt-completion form, so the loss
falls on the assistant's reply only, rendered by the model's own chat template. All data is
checked (fields, lengths in tokens) before the model is loaded; a seeded validation split is
written beside the result so the sweep can choose λ on it. The output directory appears only
when training has finished: a PEFT adapter (or a full checkpoint) with its tokenizer, the split
and training_log.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from safemerge.checkpoints.writer import write_file
from safemerge.errors import ConfigError
from safemerge.finetuning.data import check_lengths, read_examples, split, write_rows
from safemerge.finetuning.record import LOG_FILE, full_checkpoint_dtype, save, training_history, training_record
from safemerge.finetuning.settings import FinetuneResult, Settings, base_spec
from safemerge.finetuning.trainer import build_trainer, eval_loss, quiet, training_progress


def load_base(model: str) -> tuple[Path, object]:
    """The model's resolved directory and its tokenizer, which must carry a chat template."""
    from safemerge.backends.models import load_tokenizer
    from safemerge.checkpoints.readers import resolve

    path = resolve(model)
    if (path / "adapter_config.json").exists():
        raise ConfigError(f"{model} is a LoRA adapter; fine-tune its base model, "
                          "or merge the adapter first with safemerge merge")
    tokenizer = load_tokenizer(path, model, None, require_chat_template=False)
    if not tokenizer.chat_template:
        raise ConfigError(f"{model} has no chat template; finetune trains through the model's own template, "
                          "so use a chat/instruct model or add chat_template.jinja to its directory")
    return path, tokenizer


def finetune(model: str, data: str | Path, out: str | Path, *, force: bool = False, **settings) -> FinetuneResult:
    """Fine-tune MODEL on the chat data in DATA and write a PEFT LoRA adapter (or, with ``full``,
    a full checkpoint) to OUT, beside train.jsonl, val.jsonl and training_log.json. ``settings`` are
    the fields of ``Settings`` (seed, lora_r, lr, epochs, max_steps, batch_size, full, ...), whose
    defaults are defined there only.

    The loss is on the assistant's reply only, through the model's own chat template. Runs are
    seeded: the same seed on the same machine gives the same weights. Raises ``ConfigError`` for
    bad options or data (one line naming the file and line) and leaves nothing at OUT on failure.

    Example::

        finetune("Qwen/Qwen2.5-0.5B-Instruct", "task.jsonl", "./sft-seed0", seed=0)
    """
    from safemerge.checkpoints.writer import check_out

    model = str(model)
    if settings.get("target_modules"):
        settings["target_modules"] = list(settings["target_modules"])
    s = Settings(**settings)
    s.check()
    started = time.perf_counter()
    data, out = Path(data), check_out(Path(out), force)
    device = training_device(s.device)
    examples = read_examples(data)  # all data checks come before the model is loaded
    path, tokenizer = load_base(model)
    check_lengths(examples, tokenizer, s.max_length, data)
    train, val = split(examples, s.val_fraction, s.seed, data)
    from safemerge.checkpoints.writer import atomic_directory

    # the Trainer's own directory (no checkpoints are saved) is scratch; OUT is written at the end,
    # by the main process alone: under `accelerate launch` / torchrun every process trains, and which
    # one is the main process is known only once the Trainer has set up the process group
    with quiet(), tempfile.TemporaryDirectory(prefix="safemerge-finetune-") as scratch:
        trainer, targets = build_trainer(path, model, tokenizer, train, val, Path(scratch), device, s)
        before = eval_loss(trainer, "before", s.progress) if val else None
        with training_progress(trainer, s.progress):
            summary = trainer.train()
        after = eval_loss(trainer, "after", s.progress) if val else None
        history = training_history(trainer)
        main = trainer.is_world_process_zero()
        result = FinetuneResult(out, len(train), len(val), trainer.state.global_step,
                                history[-1]["loss"] if history else None, before, after, time.perf_counter() - started,
                                processes=trainer.args.world_size, published=main)
        if main:
            with atomic_directory(out, force) as tmp:
                save(trainer, tokenizer, tmp, base_spec(model), full_checkpoint_dtype(path, s))
                write_rows(tmp / "train.jsonl", train)
                write_rows(tmp / "val.jsonl", val)
                record = training_record(result, replace(s, target_modules=targets, device=device), history, summary,
                                         model, data, trainer)
                write_file(tmp / LOG_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return result


def training_device(device: str) -> str:
    """cpu or cuda: the Trainer places the model itself, on the first visible GPU."""
    from safemerge.backends.models import pick_device

    picked = pick_device(device)
    if picked.startswith("cuda:"):
        raise ConfigError(f"--device {device}: choose the GPU with CUDA_VISIBLE_DEVICES={picked[5:]} and --device cuda")
    return picked
