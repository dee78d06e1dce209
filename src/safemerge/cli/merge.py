"""`safemerge merge` and `safemerge methods`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safemerge import config
from safemerge.cli.options import AllowPickle, Debug, Force, QuietBar, invoked_as

EXAMPLES = """
Examples:

  safemerge merge meta-llama/Meta-Llama-3-8B-Instruct ./sft-gsm8k --out ./merged --method linear --lambda 0.6

  safemerge merge ./aligned ./seed0 ./seed1 ./seed2 --out ./stock --method model_stock --dtype bfloat16
"""


def merge(
    aligned: Annotated[str, typer.Argument(help="the safety-aligned model: a directory or a Hub id")],
    finetuned: Annotated[list[str], typer.Argument(help="fine-tuned model(s) or LoRA adapter(s) of ALIGNED; several are averaged (seeds)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the merged model to")],
    method: Annotated[str, typer.Option(help="merge method; see `safemerge methods`")] = "linear",
    lam: Annotated[float | None, typer.Option("--lambda", help=f"λ, the weight of the FINE-TUNED model in [0, 1]: merged = (1-λ)·aligned + λ·finetuned (default {config.DEFAULT_LAMBDA}; model_stock takes none)")] = None,
    density: Annotated[float | None, typer.Option(help=f"fraction of each delta kept by ties/dare methods (default {config.DEFAULT_DENSITY})")] = None,
    seed: Annotated[int, typer.Option(help="seed of the DARE drop masks")] = config.DEFAULT_SEED,
    dtype: Annotated[str, typer.Option(help="output dtype: auto (the aligned model's), bfloat16, float16 or float32")] = "auto",
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB or 500MB")] = config.DEFAULT_SHARD_SIZE,
    keep_aligned: Annotated[list[str] | None, typer.Option(help="regex of tensor names copied unchanged from ALIGNED (repeatable)")] = None,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check every input (headers only) and print the plan; write nothing")] = False,
    quiet: QuietBar = False,
    debug: Debug = False,
):
    """Merge ALIGNED with FINETUNED (checkpoints or LoRA adapters) and write a Hugging Face model directory."""
    from safemerge.merging.stream import merge as run_merge

    result = run_merge(aligned, finetuned, out, method=method, lam=lam, density=density, seed=seed, dtype=dtype,
                       shard_size=shard_size, keep_aligned=keep_aligned, force=force, allow_pickle=allow_pickle,
                       progress=not quiet, dry_run=dry_run, invoked_as=invoked_as())
    params = ", ".join(f"{'λ' if k == 'lam' else k}={v}" for k, v in result.params.items()) or "no parameters"
    verb = "would write" if result.dry_run else "wrote"
    typer.echo(f"{verb} {result.out}: {result.method} ({params}), {result.tensors} tensors, "
               f"{result.nbytes / 1e9:.2f} GB in {len(result.files)} shard(s)")
    for note in result.notes:
        typer.echo(f"note: {note}")


def methods():
    """List the merge methods, what each computes and the parameters it takes."""
    from safemerge.merging.methods import METHODS

    for m in METHODS.values():
        takes = ", ".join(sorted({"lam": "lambda", "density": "density", "draws": "seed"}[t] for t in m.parameters)) or "no parameters"
        typer.echo(f"{m.name:16} {m.summary}  [{takes}; {m.paper}]")
