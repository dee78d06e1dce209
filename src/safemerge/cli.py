"""The `safemerge` command: a thin typer layer over the Python API."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import config as cfg_defaults

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Merge a safety-aligned LLM with its fine-tuned version to restore its safety. "
    "λ is always the weight of the fine-tuned model: merged = (1-λ)·aligned + λ·finetuned.",
)

MERGE_EXAMPLES = """
Examples:

  safemerge merge meta-llama/Meta-Llama-3-8B-Instruct ./sft-gsm8k --out ./merged --method linear --lambda 0.6

  safemerge merge ./aligned ./seed0 ./seed1 ./seed2 --out ./stock --method model_stock --dtype bfloat16
"""

DebugOpt = Annotated[bool, typer.Option("--debug", help="show the full traceback of an error")]


@app.command(epilog=MERGE_EXAMPLES)
def merge(
    aligned: Annotated[str, typer.Argument(help="the safety-aligned model: a directory or a Hub id")],
    finetuned: Annotated[list[str], typer.Argument(help="fine-tuned model(s) or LoRA adapter(s) of ALIGNED; several are averaged (seeds)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the merged model to")],
    method: Annotated[str, typer.Option(help="merge method; see `safemerge methods`")] = "linear",
    lam: Annotated[
        float | None,
        typer.Option("--lambda", help=f"λ, the weight of the FINE-TUNED model in [0, 1]: merged = (1-λ)·aligned + λ·finetuned (default {cfg_defaults.DEFAULT_LAMBDA}; model_stock takes none)"),
    ] = None,
    density: Annotated[float | None, typer.Option(help=f"fraction of each delta kept by ties/dare methods (default {cfg_defaults.DEFAULT_DENSITY})")] = None,
    seed: Annotated[int, typer.Option(help="seed of the DARE drop masks")] = cfg_defaults.DEFAULT_SEED,
    dtype: Annotated[str, typer.Option(help="output dtype: auto (the aligned model's), bfloat16, float16 or float32")] = "auto",
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB or 500MB")] = cfg_defaults.DEFAULT_SHARD_SIZE,
    keep_aligned: Annotated[list[str] | None, typer.Option(help="regex of tensor names copied unchanged from ALIGNED (repeatable)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out (only once the new model is complete)")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="load .bin/.pt checkpoints with torch.load(weights_only=True)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check every input (headers only) and print the plan; write nothing")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    debug: DebugOpt = False,
):
    """Merge ALIGNED with FINETUNED (checkpoints or LoRA adapters) and write a Hugging Face model directory."""
    from .merge import merge as run_merge

    result = guarded(debug, run_merge, aligned, finetuned, out, method=method, lam=lam, density=density, seed=seed,
                     dtype=dtype, shard_size=shard_size, keep_aligned=keep_aligned, force=force,
                     allow_pickle=allow_pickle, progress=not quiet, dry_run=dry_run,
                     invoked_as=shlex.join(["safemerge", *sys.argv[1:]]))
    params = ", ".join(f"{'λ' if k == 'lam' else k}={v}" for k, v in result.params.items()) or "no parameters"
    verb = "would write" if result.dry_run else "wrote"
    typer.echo(f"{verb} {result.out}: {result.method} ({params}), {result.tensors} tensors, "
               f"{result.nbytes / 1e9:.2f} GB in {len(result.files)} shard(s)")
    for note in result.notes:
        typer.echo(f"note: {note}")


EVALUATE_EXAMPLES = """
Examples:

  safemerge evaluate ./merged --out ./eval --safety advbench:harmful_behaviors.csv --task gsm8k:test.jsonl --limit 50

  safemerge evaluate ./merged --out ./eval --safety advbench --safety hexphi:./HEx-PHI --judge wildguard --device cuda

  safemerge evaluate ./sft --out ./eval --task humaneval --samples 20 --pass-k 1,10 --allow-code-execution
"""


@app.command(epilog=EVALUATE_EXAMPLES)
def evaluate(
    model: Annotated[str, typer.Argument(help="model directory, Hub id or LoRA adapter to evaluate")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for results.json, responses and judgements")],
    safety: Annotated[list[str] | None, typer.Option(help="safety set (repeatable): advbench[:PATH], hexphi:PATH, xstest[:PATH], file:PATH[:COLUMN]")] = None,
    judge: Annotated[str, typer.Option(help="keyword[:FILE], wildguard[:MODEL], llamaguard[:MODEL]; auto: keyword on CPU, wildguard on GPU")] = "auto",
    task: Annotated[list[str] | None, typer.Option(help="task (repeatable): gsm8k[:PATH], bbh:PATH[:TASK], file:PATH[:SCORER], humaneval[:PATH], lm-eval:TASK")] = None,
    system_prompt: Annotated[str, typer.Option(help="system prompt of every chat request ('' for none)")] = cfg_defaults.PAPER_SYSTEM_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(help="longest response, in tokens")] = 512,
    repetition_penalty: Annotated[float, typer.Option(help="repetition penalty of safety generations (the paper's 1.2)")] = 1.2,
    task_repetition_penalty: Annotated[float, typer.Option(help="repetition penalty of task generations")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="prompts generated together")] = 8,
    limit: Annotated[int | None, typer.Option(help="only the first N prompts of each set (quick runs)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), bfloat16, float16 or float32")] = "auto",
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template for a model that has none")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="generation cache (default $SAFEMERGE_CACHE or ~/.cache/safemerge)")] = None,
    allow_code_execution: Annotated[bool, typer.Option("--allow-code-execution", help="run model-written code (HumanEval), sandboxed")] = False,
    samples: Annotated[int, typer.Option(help="HumanEval completions per problem (n of pass@k)")] = 1,
    temperature: Annotated[float, typer.Option(help="HumanEval sampling temperature when --samples > 1")] = 0.8,
    pass_k: Annotated[str, typer.Option(help="k values of pass@k, comma separated")] = "1",
    lm_eval_include: Annotated[Path | None, typer.Option(help="folder of your own lm-evaluation-harness task YAMLs")] = None,
    bertscore_model: Annotated[str, typer.Option(help="BERTScore model (file:PATH:bertscore tasks)")] = "microsoft/deberta-xlarge-mnli",
    bertscore_layer: Annotated[int, typer.Option(help="BERTScore layer")] = 40,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="load .bin/.pt checkpoints with torch.load(weights_only=True)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no table")] = False,
    debug: DebugOpt = False,
):
    """Measure MODEL's attack success rate on harmful prompts and its score on tasks."""
    from .evaluate import evaluate as run_evaluate
    from .evaluate import print_summary

    quiet_libraries()
    result = guarded(debug, run_evaluate, model, out, safety=safety or [], judge=judge, tasks=task or [],
                     system_prompt=system_prompt, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                     task_repetition_penalty=task_repetition_penalty, batch_size=batch_size, limit=limit,
                     device=device, dtype=dtype, chat_template=chat_template, cache_dir=cache_dir,
                     allow_code_execution=allow_code_execution, samples=samples, temperature=temperature,
                     pass_k=guarded(debug, parse_ints, pass_k, "--pass-k"), lm_eval_include=lm_eval_include,
                     bertscore_model=bertscore_model,
                     bertscore_layer=bertscore_layer, seed=seed, force=force, allow_pickle=allow_pickle,
                     progress=not quiet, invoked_as=shlex.join(["safemerge", *sys.argv[1:]]))
    if not quiet:
        print_summary(result.results)
    typer.echo(f"wrote {result.out}/results.json")


def parse_ints(text: str, flag: str) -> list[int]:
    from .errors import ConfigError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 1,10; got {text!r}") from None


def quiet_libraries() -> None:
    """transformers' own progress bars and advice would bury safemerge's one line per event."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def methods():
    """List the merge methods, what each computes and the parameters it takes."""
    from .methods import METHODS

    for m in METHODS.values():
        takes = ", ".join(sorted({"lam": "lambda", "density": "density", "draws": "seed"}[t] for t in m.parameters)) or "no parameters"
        typer.echo(f"{m.name:16} {m.summary}  [{takes}; {m.paper}]")


def guarded(debug: bool, fn, *args, **kwargs):
    """Run a library call; a SafemergeError becomes one line on stderr and exit code 1."""
    from .errors import SafemergeError

    try:
        return fn(*args, **kwargs)
    except SafemergeError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as e:
        if debug:
            raise
        typer.echo("error: interrupted; nothing was written", err=True)
        raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so that temporary output is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="safemerge")


if __name__ == "__main__":
    sys.exit(main())
