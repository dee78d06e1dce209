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

import hashlib
import json
import math
import os
import platform
import random
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path

from safemerge.checkpoints.readers import SET_VALUED
from safemerge.checkpoints.writer import write_file
from safemerge.errors import ConfigError

LOG_FILE = "training_log.json"
LINEAR_TYPES = ("Linear", "Conv1D")  # torch.nn.Linear, and GPT-2-style transformers Conv1D


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the data file
    raw: str  # the line as the user wrote it (kept for train.jsonl / val.jsonl)
    prompt: list[dict]  # messages before the reply
    completion: list[dict]  # [{"role": "assistant", "content": ...}]


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


# --- data --------------------------------------------------------------------------------


def read_examples(path: Path) -> list[Example]:
    """Every non-blank line of a JSONL file, checked and converted; one-line errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist; give a JSONL file with --data") from None
    except IsADirectoryError:
        raise ConfigError(f"data file {path} is a directory; give a JSONL file with --data") from None
    except UnicodeDecodeError:
        raise ConfigError(f"data file {path} is not UTF-8 text; give a JSONL file with --data") from None
    except OSError as e:
        raise ConfigError(f"cannot read data file {path}: {e.strerror}") from None
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                              "each line must be one JSON object") from None
        prompt, reply = conversation(row, where)
        examples.append(Example(number, line.strip(), prompt, [{"role": "assistant", "content": reply}]))
    if not examples:
        raise ConfigError(f"data file {path} has no examples; it needs one JSON object per line")
    return examples


FORMATS = "'messages', or 'prompt' and 'response', or 'instruction' and 'output'"


def conversation(row, where: str) -> tuple[list[dict], str]:
    """(messages before the reply, the reply) from any of the three accepted row formats."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with {FORMATS}, found {type(row).__name__}")
    if "messages" in row:
        return from_messages(row["messages"], where)
    if "prompt" in row or "response" in row:
        prompt, reply = text_fields(row, ("prompt", "response"), where)
        return [{"role": "user", "content": prompt}], reply
    if "instruction" in row or "output" in row:
        instruction, reply = text_fields(row, ("instruction", "output"), where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ConfigError(f"{where}: field 'input' must be a string")
        return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}], reply
    raise ConfigError(f"{where}: no {FORMATS} field; found {', '.join(map(repr, row)) or 'an empty object'}")


def text_fields(row: dict, names: tuple[str, str], where: str) -> tuple[str, str]:
    for name in names:
        if name not in row:
            raise ConfigError(f"{where}: missing field '{name}' (a row with '{names[0]}' needs '{names[1]}' too)")
        if not isinstance(row[name], str) or not row[name].strip():
            what = "empty assistant turn" if name == names[1] else "empty prompt"
            raise ConfigError(f"{where}: {what}: field '{name}' must be a non-empty string")
    return row[names[0]], row[names[1]]


def from_messages(messages, where: str) -> tuple[list[dict], str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where}: 'messages' must be a list of at least two messages "
                          "(a user turn, then the assistant's reply)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i} must be an object with string fields 'role' and 'content'")
    last = messages[-1]
    if last["role"] != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's reply (role 'assistant'), "
                          f"found role '{last['role']}'")
    if not last["content"].strip():
        raise ConfigError(f"{where}: empty assistant turn: the last message has no content")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], last["content"]


def check_lengths(examples: list[Example], tokenizer, max_length: int, path: Path) -> None:
    """Render each row through the chat template as TRL will, and refuse rows it would truncate."""
    from jinja2 import TemplateError

    for ex in examples:
        where = f"{path}, line {ex.line}"
        try:
            ids = tokenizer.apply_chat_template(ex.prompt + ex.completion, tokenize=True, return_dict=True)["input_ids"]
        except (TemplateError, ValueError) as e:  # roles or orders the template rejects
            first_line = str(e).splitlines()[0]
            raise ConfigError(f"{where}: the model's chat template cannot render this row: {first_line}") from None
        if len(ids) > max_length:
            raise ConfigError(f"{where}: {len(ids)} tokens with the chat template, over --max-length {max_length}; "
                              "raise --max-length or shorten this row")


def split(examples: list[Example], val_fraction: float, seed: int, path: Path) -> tuple[list[Example], list[Example]]:
    """A seeded random validation split (at least one row when val_fraction > 0); both keep file order."""
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if len(examples) - n_val < 1:
        raise ConfigError(f"data file {path} has {len(examples)} example(s), too few to hold out a validation split; "
                          "add rows or pass --val-fraction 0")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def as_dataset(examples: list[Example]):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])


def write_rows(path: Path, examples: list[Example]) -> None:
    write_file(path, "".join(e.raw + "\n" for e in examples))


# --- model -------------------------------------------------------------------------------


def lora_targets(model) -> list[str]:
    """Names of the linear layers inside the repeated decoder blocks (attention and MLP): every
    Linear whose path runs through a numbered layer, never the LM head or the embeddings."""
    skip = {id(m) for m in (model.get_output_embeddings(), model.get_input_embeddings()) if m is not None}
    names = []
    for path, module in model.named_modules():
        parts = path.split(".")
        in_block = any(p.isdigit() for p in parts[:-1])
        if type(module).__name__ in LINEAR_TYPES and id(module) not in skip and in_block and parts[-1] not in names:
            names.append(parts[-1])
    if not names:
        raise ConfigError(f"found no linear layers in the decoder blocks of {type(model).__name__}; "
                          "pass target_modules")
    return names


def check_targets(model, names: list[str], spec: str) -> None:
    present = {path.split(".")[-1] for path, _ in model.named_modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(f"target_modules {', '.join(missing)} name no module of {spec}; "
                          f"its decoder blocks have {', '.join(lora_targets(model))}")


def base_spec(model: str) -> str:
    """The model as the adapter should name it: an absolute path when local, else the Hub id."""
    path = Path(model).expanduser()
    return os.path.abspath(path) if path.exists() else model


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


def planned_steps(rows: int, s: Settings, processes: int = 1) -> int:
    """Optimizer steps as the Trainer counts them: each of PROCESSES data-parallel processes takes
    a batch of its own per step, and an epoch ends with a short batch (none is dropped)."""
    return s.max_steps or max(1, math.ceil(s.epochs * math.ceil(rows / (s.batch_size * processes))))


def warmup_steps(steps: int, ratio: float) -> int:
    """The warm-up as a whole number of steps, rounded up as transformers rounds a ratio."""
    return math.ceil(steps * ratio)


# transformers 4.x's spelling of a field that 5.x renamed: passed only to a release that has it
OLDER_SPELLINGS = {"group_by_length"}


def sft_config(tmp: Path, device: str, s: Settings, train_rows: int):
    """TRL's SFTConfig. Every field that changes what a run computes is set here (``numerics``), so
    that a new TRL or transformers default cannot change a run; the rest: no mid-training
    checkpoints, no reporting, no tqdm (our bar is a callback), the libraries' log level left as
    ``quiet`` set it in every process."""
    from trl import SFTConfig

    housekeeping = {
        "output_dir": str(tmp), "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "log_level": "passive", "log_level_replica": "passive",
        "logging_strategy": "steps", "logging_steps": 1, "logging_first_step": True,
    }
    args = SFTConfig(**supported(SFTConfig, {**numerics(device, s), **housekeeping}))
    # both count optimizer steps, which depend on the data-parallel world size (accelerate launch,
    # torchrun) that the arguments have just set up. The warm-up is a whole number of steps because
    # a float warmup_steps is a ratio in transformers 5 but a step count in 4.x
    steps = planned_steps(train_rows, s, args.world_size)
    args.warmup_steps = warmup_steps(steps, s.warmup_ratio)
    args.logging_steps = s.logging_steps or max(1, steps // 50)
    return args


def numerics(device: str, s: Settings) -> dict:
    """Every SFTConfig field that changes the numbers a run produces, set explicitly. Unless a comment
    says otherwise the value is the default of TRL 1.16 / transformers 5.24; the warm-up and logging
    steps are set in ``sft_config``."""
    import torch

    on_cpu = device == "cpu"
    return {
        # AdamW as torch implements it (not the fused kernel transformers 5 picks on torch >= 2.8)
        "optim": "adamw_torch", "optim_args": None, "optim_target_modules": None, "learning_rate": s.lr,
        "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0, "label_smoothing_factor": 0.0,
        # cosine decay to 0 over the run after the linear warm-up (transformers: linear decay)
        "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 0.5},
        # which examples each step sees, in which order
        "seed": s.seed, "data_seed": s.seed, "full_determinism": False,
        "num_train_epochs": s.epochs, "max_steps": s.max_steps or -1,
        "per_device_train_batch_size": s.batch_size, "per_device_eval_batch_size": s.batch_size,
        "gradient_accumulation_steps": 1, "auto_find_batch_size": False, "average_tokens_across_devices": True,
        "train_sampling_strategy": "random", "group_by_length": False, "dataloader_drop_last": False,
        "dataloader_num_workers": 0,
        # accelerate's data sharding; dispatch_batches' default None means False for a map-style dataset
        "accelerator_config": {"split_batches": False, "dispatch_batches": False, "even_batches": True,
                               "use_seedable_sampler": True},
        # precision: float32 on CPU, bfloat16 autocast on GPUs that have it; full float32 matmuls
        # (tf32 False; transformers' None leaves torch's global setting as it finds it)
        "use_cpu": on_cpu, "bf16": not on_cpu and torch.cuda.is_bf16_supported(), "fp16": False,
        "bf16_full_eval": False, "fp16_full_eval": False, "tf32": False,
        # the forward pass: nothing swapped, compiled or perturbed; checkpointing saves GPU memory
        # (TRL's default: on), on CPU it only costs time
        "activation_checkpointing": not on_cpu, "gradient_checkpointing": not on_cpu,
        "activation_offloading": False, "torch_compile": False, "torch_compile_backend": None,
        "torch_compile_mode": None, "use_liger_kernel": False, "liger_kernel_config": None,
        "neftune_noise_alpha": None, "router_aux_loss_coef": None,  # None: a MoE model's own coefficient
        # the data as TRL renders it: the model's own chat template and end-of-turn token, one process,
        # no reordering, no packing or padding tricks, loss on the completion (the assistant's reply)
        "chat_template_path": None, "eos_token": None, "dataset_text_field": "text", "dataset_kwargs": None,
        "dataset_num_proc": None, "max_length": s.max_length, "truncation_mode": "keep_start",
        "shuffle_dataset": False, "packing": False, "eval_packing": False,  # TRL: None, i.e. as packing
        "padding_free": False,
        "pad_to_multiple_of": None,  # TRL's "auto": 128 on AWS Neuron, none elsewhere
        "completion_only_loss": True, "assistant_only_loss": False,  # TRL: None (by the data's form), False
        "loss_type": "nll",
        # a step whose loss is nan or inf enters the logged loss (training_log.json) as the others' mean
        "logging_nan_inf_filter": True,
    }


def supported(config_class, values: dict) -> dict:
    """The fields this TRL / transformers release has: a new name is dropped by an old release, and
    an old spelling (OLDER_SPELLINGS) by a new one."""
    known = {f.name for f in fields(config_class)}
    return {k: v for k, v in values.items() if k in known}


def build_trainer(path: Path, spec: str, tokenizer, train: list[Example], val: list[Example], tmp: Path,
                  device: str, s: Settings):
    """The SFTTrainer that ``finetune`` runs, untrained (tests inspect its batches), and the
    LoRA target modules it uses (None with ``full``)."""
    import torch
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    from safemerge.backends.models import from_pretrained

    # LoRA on a GPU keeps the frozen weights in bfloat16; trained weights stay float32
    dtype = torch.bfloat16 if device != "cpu" and not s.full and torch.cuda.is_bf16_supported() else torch.float32
    model = from_pretrained(path, dtype, allow_pickle=False)
    targets, peft_config = None, None
    if not s.full:
        targets = s.target_modules or lora_targets(model)
        check_targets(model, targets, spec)
        peft_config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_config(tmp, device, s, len(train)), train_dataset=as_dataset(train),
                         eval_dataset=as_dataset(val) if val else None, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[log_last_step()])
    # the Trainer shows either tqdm or, without it, prints every log dict; ours is training_progress
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer, targets


def log_last_step():
    """A callback that logs the final step too, so the last training loss is always in the log."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep()


@contextmanager
def training_progress(trainer, enabled: bool):
    """Our one bar for ``trainer.train()`` inside the block (see ``training_bar``)."""
    callback = training_bar(enabled)
    trainer.add_callback(callback)
    try:
        yield
    finally:  # an error inside train() skips on_train_end
        callback.bar.close()
        trainer.remove_callback(callback)


def training_bar(enabled: bool):
    """A callback that drives one rich bar: steps done of the run, elapsed time, ETA and the latest
    logged loss. Only the main process draws it: under accelerate launch every process trains."""
    from transformers import TrainerCallback

    from safemerge.progress import Bar, open_bar

    class TrainingBar(TrainerCallback):
        def __init__(self):
            self.bar = Bar()

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = open_bar("training", state.max_steps, enabled and state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.update(state.global_step, f"training, loss {logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return TrainingBar()


# --- the command -------------------------------------------------------------------------


def finetune(model: str, data: str | Path, out: str | Path, *, val_fraction: float = 0.1, seed: int = 42,
             lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0, target_modules: list[str] | None = None,
             lr: float = 1e-4, epochs: float = 3, max_steps: int | None = None, batch_size: int = 8,
             max_length: int = 1024, full: bool = False, warmup_ratio: float = 0.1, device: str = "auto",
             force: bool = False, progress: bool = True, logging_steps: int | None = None) -> FinetuneResult:
    """Fine-tune MODEL on the chat data in DATA and write a PEFT LoRA adapter (or, with ``full``,
    a full checkpoint) to OUT, beside train.jsonl, val.jsonl and training_log.json.

    The loss is on the assistant's reply only, through the model's own chat template. Runs are
    seeded: the same seed on the same machine gives the same weights. Raises ``ConfigError`` for
    bad options or data (one line naming the file and line) and leaves nothing at OUT on failure.

    Example::

        finetune("Qwen/Qwen2.5-0.5B-Instruct", "task.jsonl", "./sft-seed0", seed=0)
    """
    from safemerge.checkpoints.writer import check_out

    model = str(model)
    s = Settings(val_fraction=val_fraction, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                 target_modules=list(target_modules) if target_modules else None, lr=lr, epochs=epochs,
                 max_steps=max_steps, batch_size=batch_size, max_length=max_length, full=full,
                 warmup_ratio=warmup_ratio, device=device, progress=progress, logging_steps=logging_steps)
    s.check()
    started = time.perf_counter()
    data, out = Path(data), check_out(Path(out), force)
    device = training_device(device)
    examples = read_examples(data)  # all data checks come before the model is loaded
    path, tokenizer = load_base(model)
    check_lengths(examples, tokenizer, max_length, data)
    train, val = split(examples, val_fraction, seed, data)
    from safemerge.checkpoints.writer import atomic_directory

    # the Trainer's own directory (no checkpoints are saved) is scratch; OUT is written at the end,
    # by the main process alone: under `accelerate launch` / torchrun every process trains, and which
    # one is the main process is known only once the Trainer has set up the process group
    with quiet(), tempfile.TemporaryDirectory(prefix="safemerge-finetune-") as scratch:
        trainer, targets = build_trainer(path, model, tokenizer, train, val, Path(scratch), device, s)
        before = eval_loss(trainer, "before", progress) if val else None
        with training_progress(trainer, progress):
            summary = trainer.train()
        after = eval_loss(trainer, "after", progress) if val else None
        history = training_history(trainer)
        main = trainer.is_world_process_zero()
        result = FinetuneResult(out, len(train), len(val), trainer.state.global_step,
                                history[-1]["loss"] if history else None, before, after, time.perf_counter() - started,
                                processes=trainer.args.world_size, published=main)
        if main:
            with atomic_directory(out, force) as tmp:
                save(trainer, tokenizer, tmp, base_spec(model), full)
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


@contextmanager
def quiet():
    """Nothing from the libraries while we train (datasets' map bars, transformers' logs; see
    ``libraries_silenced``), and no deprecation notice TRL triggers inside transformers, which is
    not the user's to act on."""
    from safemerge.progress import libraries_silenced

    with libraries_silenced(), warnings.catch_warnings():
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing; TRL and older
        # transformers know only the old name, which keeps working
        warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing` is deprecated", FutureWarning)
        yield


def eval_loss(trainer, when: str, progress: bool) -> float:
    from safemerge.progress import status

    with status(f"validation loss {when} training", progress and trainer.is_world_process_zero()):
        return float(trainer.evaluate()["eval_loss"])


def save(trainer, tokenizer, directory: Path, spec: str, full: bool) -> None:
    """The adapter (naming its base as the user gave it) or the full model, with the tokenizer."""
    model = trainer.model
    if not full:
        model.peft_config["default"].base_model_name_or_path = spec
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if not full:  # the same adapter_config.json bytes in every run (PEFT writes target_modules from a set)
        config = directory / "adapter_config.json"
        values = json.loads(config.read_text())
        values.update({k: sorted(values[k]) for k in SET_VALUED if isinstance(values.get(k), list)})
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


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
