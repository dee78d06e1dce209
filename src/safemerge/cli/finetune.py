"""`safemerge finetune` and `safemerge demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from safemerge.cli.options import Debug, Device, QuietBar, quiet_libraries
from safemerge.errors import ConfigError
from safemerge.finetuning.settings import Settings

EXAMPLES = """
Examples:

  safemerge finetune meta-llama/Meta-Llama-3-8B-Instruct --data gsm8k-train.jsonl --out ./sft-lora --seed 0

  safemerge finetune ./aligned --data chat.jsonl --out ./sft-full --full --lr 2e-5 --epochs 1
"""


def setting_default(name: str):
    """The default of the fine-tune setting NAME: defined once, in finetuning.Settings."""
    return Settings.__dataclass_fields__[name].default


def finetune(
    model: Annotated[str, typer.Argument(help="the model to fine-tune: a directory or a Hub id")],
    data: Annotated[Path, typer.Option(help="JSONL: `messages` (chat), or `prompt`/`response`, or `instruction`/`output`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the adapter (or the full model with --full)")],
    val_fraction: Annotated[float, typer.Option(help="part of the data kept out for validation (OUT/val.jsonl)")] = setting_default("val_fraction"),
    seed: Annotated[int, typer.Option(help="seed of the split, the adapter's initialisation and the data order")] = setting_default("seed"),
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = setting_default("lora_r"),
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scaling alpha/r)")] = setting_default("lora_alpha"),
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine schedule, 10% warm-up)")] = setting_default("lr"),
    epochs: Annotated[float, typer.Option(help="passes over the training data")] = setting_default("epochs"),
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps; overrides --epochs")] = None,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = setting_default("batch_size"),
    max_length: Annotated[int, typer.Option(help="longest example in tokens; longer ones are an error, never cut")] = setting_default("max_length"),
    full: Annotated[bool, typer.Option("--full", help="train every weight and write a full checkpoint instead of an adapter")] = False,
    dtype: Annotated[str, typer.Option(help="--full: dtype of the checkpoint written; auto keeps the base model's")] = setting_default("dtype"),
    device: Device = setting_default("device"),
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out once training has finished")] = False,
    quiet: QuietBar = False,
    debug: Debug = False,
):
    """Fine-tune MODEL with LoRA (or fully) on chat data; the loss is on the assistant's replies only."""
    from safemerge.finetuning.train import finetune as run_finetune

    quiet_libraries()
    result = run_finetune(model, data, out, val_fraction=val_fraction, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                          lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                          full=full, dtype=dtype, device=device, force=force, progress=not quiet)
    if not result.published:
        return  # a data-parallel helper process: the main one reports
    val = (f"; validation loss {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}"
           if result.val_loss_before is not None and result.val_loss_after is not None else "")
    processes = f" on {result.processes} processes (global batch {result.processes * batch_size})" if result.processes > 1 else ""
    typer.echo(f"wrote {result.out}: {result.steps} steps on {result.train_examples} examples "
               f"in {result.seconds:.1f} s{processes}{val}")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the data, the fine-tunes and the sweep")] = Path("safemerge-demo"),
    seeds: Annotated[int, typer.Option(help="fine-tuning seeds (2 or more, so model_stock runs)")] = 2,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild the tiny aligned model instead of taking it from the cache")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    debug: Debug = False,
):
    """The whole loop on a laptop CPU: a tiny aligned model, fine-tuned on a benign task, merged back, with a report."""
    from safemerge.demo.numerics import can_pin, is_pinned, run_pinned
    from safemerge.demo.run import print_summary, run_demo

    if can_pin() and not is_pinned():  # the numeric settings are read when torch loads: start again with them
        raise typer.Exit(run_pinned(sys.argv[1:]))
    quiet_libraries()
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1 (2 or more so that model_stock runs)")
    print_summary(run_demo(out, seeds=seeds, rebuild=rebuild, progress=not quiet, echo=typer.echo))
