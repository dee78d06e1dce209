"""TRL's SFTTrainer set up with every numeric setting pinned, and its progress on one bar."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from safemerge.errors import ConfigError
from safemerge.finetuning.data import Example, as_dataset
from safemerge.finetuning.settings import Settings

LINEAR_TYPES = ("Linear", "Conv1D")  # torch.nn.Linear, and GPT-2-style transformers Conv1D


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
    trainer = SFTTrainer(model=model, args=sft_config(tmp, device, s, len(train)), train_dataset=as_dataset(train, tokenizer),
                         eval_dataset=as_dataset(val, tokenizer) if val else None, processing_class=tokenizer,
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
