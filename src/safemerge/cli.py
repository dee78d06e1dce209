"""The `safemerge` command: a thin typer layer over the Python API."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from safemerge import config as cfg_defaults

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
    from safemerge.merging.stream import merge as run_merge

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
    backend: Annotated[str, typer.Option(help="transformers, or vllm (GPU; pip install 'safemerge[vllm]')")] = "transformers",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm: GPUs one model is split over")] = 1,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the model's engine takes")] = 0.9,
    judge_gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the judge's engine takes (after the model's is shut down)")] = 0.9,
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
    from safemerge.evaluation.console import print_summary
    from safemerge.evaluation.run import evaluate as run_evaluate

    quiet_libraries()
    result = guarded(debug, run_evaluate, model, out, safety=safety or [], judge=judge, tasks=task or [],
                     system_prompt=system_prompt, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                     task_repetition_penalty=task_repetition_penalty, batch_size=batch_size, backend=backend,
                     tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                     judge_gpu_memory_utilization=judge_gpu_memory_utilization, limit=limit, device=device, dtype=dtype,
                     chat_template=chat_template, cache_dir=cache_dir,
                     allow_code_execution=allow_code_execution, samples=samples, temperature=temperature,
                     pass_k=guarded(debug, parse_ints, pass_k, "--pass-k"), lm_eval_include=lm_eval_include,
                     bertscore_model=bertscore_model,
                     bertscore_layer=bertscore_layer, seed=seed, force=force, allow_pickle=allow_pickle,
                     progress=not quiet, invoked_as=shlex.join(["safemerge", *sys.argv[1:]]))
    if not quiet:
        print_summary(result.results)
    typer.echo(f"wrote {result.out}/results.json")


SWEEP_EXAMPLES = """
Examples:

  safemerge sweep --aligned meta-llama/Meta-Llama-3-8B-Instruct --finetuned ./seed0 ./seed1 ./seed2 --out ./run
                  --safety advbench --judge wildguard --task-val gsm8k:val.jsonl --task-test gsm8k:test.jsonl

  safemerge sweep --aligned ./aligned --finetuned ./sft-lora --out ./run --methods linear,slerp --search bisect
                  --safety advbench:harmful_behaviors.csv --task-val file:val.jsonl:exact
"""


@app.command(epilog=SWEEP_EXAMPLES)
def sweep(
    aligned: Annotated[str, typer.Option(help="the safety-aligned model: a directory or a Hub id")],
    finetuned: Annotated[list[str], typer.Option(help="fine-tuned model or LoRA adapter; several (seeds of one fine-tuning) may follow")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory: trials, results.json, report, merged/")],
    more_finetuned: Annotated[list[str] | None, typer.Argument(help="more fine-tuned seeds", show_default=False)] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated merge methods (default linear,slerp,dare_linear,ties and model_stock with ≥ 2 seeds)")] = None,
    lambdas: Annotated[str, typer.Option(help="comma-separated λ grid, strictly between 0 and 1")] = "0.2,0.4,0.6,0.8",
    search: Annotated[str, typer.Option(help="grid, or bisect: per method the largest λ meeting the safety constraint")] = "grid",
    tolerance: Annotated[float, typer.Option(help="bisection and refinement tolerance on λ")] = 0.05,
    refine: Annotated[bool, typer.Option("--refine/--no-refine", help="grid: then bisect each method between its largest passing λ and the next one tried, to the tolerance")] = True,
    policy: Annotated[str, typer.Option(help="constrained (best validation score within the ASR bound) or paper (best validation score)")] = "constrained",
    max_asr_increase: Annotated[float, typer.Option(help="constrained: allowed rise of ASR over the aligned model's (paired test: one-sided 95% upper bound of the difference on the same prompts)")] = 0.02,
    density: Annotated[float | None, typer.Option(help="ties/dare density (default 0.5)")] = None,
    merge_seed: Annotated[int, typer.Option(help="seed of the DARE drop masks")] = cfg_defaults.DEFAULT_SEED,
    merge_dtype: Annotated[str, typer.Option(help="dtype of the merged weights: auto (the aligned model's), bfloat16, float16, float32")] = "auto",
    safety: Annotated[list[str] | None, typer.Option(help="safety set (repeatable), as in `safemerge evaluate`")] = None,
    selection_fraction: Annotated[float, typer.Option(help="part of each safety set used to choose; the rest is reported")] = 0.5,
    judge: Annotated[str, typer.Option(help="keyword[:FILE], wildguard[:MODEL], llamaguard[:MODEL]; auto: keyword on CPU, wildguard on GPU")] = "auto",
    task_val: Annotated[list[str] | None, typer.Option(help="validation task (repeatable): its score chooses λ")] = None,
    task_test: Annotated[list[str] | None, typer.Option(help="test task (repeatable): reported")] = None,
    keep: Annotated[str, typer.Option(help="merged models to write: chosen, all or none")] = "chosen",
    executor: Annotated[str, typer.Option(help="local (this process) or ray (pip install 'safemerge[ray]')")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: the cluster to join, e.g. auto or HOST:PORT (default: a local instance)")] = None,
    gpus_per_trial: Annotated[float, typer.Option(help="ray: GPUs per worker (each runs one trial at a time)")] = 0,
    num_workers: Annotated[int | None, typer.Option(help="ray: number of workers (default: as many as fit)")] = None,
    judge_placement: Annotated[str, typer.Option(help="ray: worker (a judge model in every worker) or shared (one judge actor for all)")] = "worker",
    judge_gpus: Annotated[float, typer.Option(help="ray, --judge-placement shared: GPUs of the judge actor")] = 0,
    backend: Annotated[str, typer.Option(help="transformers, or vllm (GPU; pip install 'safemerge[vllm]'): a LoRA fine-tune's linear merges are served as λ-scaled adapters of one engine")] = "transformers",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm: GPUs one model is split over")] = 1,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the trial model's engine takes")] = 0.55,
    judge_gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the judge's engine takes (both stay loaded)")] = 0.35,
    system_prompt: Annotated[str, typer.Option(help="system prompt of every chat request ('' for none)")] = cfg_defaults.PAPER_SYSTEM_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(help="longest response, in tokens")] = 512,
    repetition_penalty: Annotated[float, typer.Option(help="repetition penalty of safety generations")] = 1.2,
    task_repetition_penalty: Annotated[float, typer.Option(help="repetition penalty of task generations")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="prompts generated together")] = 8,
    limit: Annotated[int | None, typer.Option(help="only the first N prompts of each set")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="dtype the trial models compute in: auto, bfloat16, float16, float32")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="generation cache (default RUN/cache)")] = None,
    allow_code_execution: Annotated[bool, typer.Option("--allow-code-execution", help="run model-written code (HumanEval), sandboxed")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="load .bin/.pt checkpoints with torch.load(weights_only=True)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (trials, generations, judge calls, a GPU-hour bound) and run nothing")] = False,
    tokens_per_second: Annotated[float, typer.Option(help="--dry-run: ASSUMED generation throughput per GPU, for the GPU-hour bound")] = 2500.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no table")] = False,
    debug: DebugOpt = False,
):
    """Merge by every method and λ, evaluate each merge, choose one, and write it with a report."""
    values = dict(aligned=aligned, finetuned=[*finetuned, *(more_finetuned or [])], out=out,
                  methods=guarded(debug, parse_list, methods, "--methods") if methods else None,
                  lambdas=guarded(debug, parse_floats, lambdas, "--lambdas"), search=search, tolerance=tolerance,
                  refine=refine, policy=policy, max_asr_increase=max_asr_increase, density=density, merge_seed=merge_seed,
                  merge_dtype=merge_dtype, safety=safety or [], selection_fraction=selection_fraction, judge=judge,
                  task_val=task_val or [], task_test=task_test or [], keep=keep, executor=executor, address=address,
                  gpus_per_trial=gpus_per_trial, num_workers=num_workers, judge_placement=judge_placement,
                  judge_gpus=judge_gpus, backend=backend,
                  tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                  judge_gpu_memory_utilization=judge_gpu_memory_utilization, system_prompt=system_prompt,
                  max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                  task_repetition_penalty=task_repetition_penalty, batch_size=batch_size, limit=limit, device=device,
                  dtype=dtype, cache_dir=cache_dir, allow_code_execution=allow_code_execution, allow_pickle=allow_pickle)
    if dry_run:
        print_dry_run(values, tokens_per_second, debug)
        return
    run_sweep_values(values, quiet, debug)


def print_dry_run(values: dict, tokens_per_second: float, debug: bool) -> None:
    from safemerge.config import SweepConfig, validate
    from safemerge.sweeps.dry_run import dry_run

    cfg = guarded(debug, validate, SweepConfig, **values)
    plan = guarded(debug, dry_run, cfg, tokens_per_second)
    tasks = ", ".join(f"{k} {v}" for k, v in plan["task_generations_per_trial"].items()) or "none"
    typer.echo(f"trials: {plan['trials']} ({plan['search']}; methods {', '.join(plan['methods'])}; "
               f"λ {', '.join(f'{x:g}' for x in plan['lambdas'])}; {plan['seeds']} seed(s); baselines included"
               + (f"; up to {plan['refinement_trials']} refining λ on the safety boundary" if plan["refinement_trials"] else "")
               + ")")
    typer.echo(f"per trial: {plan['safety_prompts_per_trial']} safety prompts; task generations: {tasks}")
    typer.echo(f"generations: {plan['generations']:,}; judge {plan['judge']}: {plan['judge_calls']:,} model calls")
    typer.echo(f"generated tokens: at most {plan['max_generated_tokens']:,}; at an assumed {tokens_per_second:,.0f} "
               f"tokens/s per GPU that is at most {plan['gpu_hours_upper_bound']:.1f} GPU hours")
    if plan["vllm"]:
        v = plan["vllm"]
        typer.echo(f"vllm: {v['lora_trials']} trials served by one engine on the aligned model ({v['lora_adapters']} "
                   f"LoRA fine-tune(s), λ as scaled adapters, shared batches); {v['merged_trials']} merges written to "
                   f"scratch with an engine each; {v['engine_starts']} engine starts")


@app.command("run")
def run_config(
    config: Annotated[Path, typer.Argument(help="a YAML file with the sweep's settings (the fields of `safemerge sweep`)")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no table")] = False,
    debug: DebugOpt = False,
):
    """Run a sweep described by one YAML file."""
    run_sweep_values(guarded(debug, read_yaml, config), quiet, debug)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="a run directory written by `safemerge sweep`")],
    debug: DebugOpt = False,
):
    """Rebuild results.json and the report of RUN from its stored trials (no model is loaded)."""
    from safemerge.sweeps.run import rebuild_report

    results = guarded(debug, rebuild_report, run)
    print_sweep_summary(results)
    typer.echo(f"wrote {run}/results.json, {run}/report.md and {run}/report.html")


def run_sweep_values(values: dict, quiet: bool, debug: bool) -> None:
    from safemerge.config import SweepConfig, validate
    from safemerge.sweeps.run import sweep as run_sweep

    quiet_libraries()
    cfg = guarded(debug, validate, SweepConfig, **values)
    result = guarded(debug, run_sweep, cfg, progress=not quiet, invoked_as=shlex.join(["safemerge", *sys.argv[1:]]))
    if not quiet:
        print_sweep_summary(result.results)
    typer.echo(f"{result.results['choice']['reason']}")
    typer.echo(f"wrote {result.out}/results.json, report.md and report.html"
               + (f"; the chosen model is in {result.out}/merged" if result.results.get("merged") else ""))


def print_sweep_summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from safemerge.report.tables import paper_table

    header, rows = paper_table(results)
    table = Table(title="safemerge sweep")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def read_yaml(path: Path) -> dict:
    import yaml

    from safemerge.errors import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sweep settings (aligned:, finetuned:, out:, ...)")
    return data  # relative paths in it are relative to the current directory, as on the command line


def parse_list(text: str, flag: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_floats(text: str, flag: str) -> list[float]:
    from safemerge.errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 0.2,0.4; got {text!r}") from None


FINETUNE_EXAMPLES = """
Examples:

  safemerge finetune meta-llama/Meta-Llama-3-8B-Instruct --data gsm8k-train.jsonl --out ./sft-lora --seed 0

  safemerge finetune ./aligned --data chat.jsonl --out ./sft-full --full --lr 2e-5 --epochs 1
"""


@app.command(epilog=FINETUNE_EXAMPLES)
def finetune(
    model: Annotated[str, typer.Argument(help="the model to fine-tune: a directory or a Hub id")],
    data: Annotated[Path, typer.Option(help="JSONL: `messages` (chat), or `prompt`/`response`, or `instruction`/`output`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the adapter (or the full model with --full)")],
    val_fraction: Annotated[float, typer.Option(help="part of the data kept out for validation (OUT/val.jsonl)")] = 0.1,
    seed: Annotated[int, typer.Option(help="seed of the split, the adapter's initialisation and the data order")] = 42,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scaling alpha/r)")] = 16,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine schedule, 10% warm-up)")] = 1e-4,
    epochs: Annotated[float, typer.Option(help="passes over the training data")] = 3,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps; overrides --epochs")] = None,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 8,
    max_length: Annotated[int, typer.Option(help="longest example in tokens; longer ones are an error, never cut")] = 1024,
    full: Annotated[bool, typer.Option("--full", help="train every weight and write a full checkpoint instead of an adapter")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out once training has finished")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    debug: DebugOpt = False,
):
    """Fine-tune MODEL with LoRA (or fully) on chat data; the loss is on the assistant's replies only."""
    from safemerge.finetuning.train import finetune as run_finetune

    quiet_libraries()
    result = guarded(debug, run_finetune, model, data, out, val_fraction=val_fraction, seed=seed, lora_r=lora_r,
                     lora_alpha=lora_alpha, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                     max_length=max_length, full=full, device=device, force=force, progress=not quiet)
    if not result.published:
        return  # a data-parallel helper process: the main one reports
    val = (f"; validation loss {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}"
           if result.val_loss_before is not None and result.val_loss_after is not None else "")
    processes = f" on {result.processes} processes (global batch {result.processes * batch_size})" if result.processes > 1 else ""
    typer.echo(f"wrote {result.out}: {result.steps} steps on {result.train_examples} examples "
               f"in {result.seconds:.1f} s{processes}{val}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the data, the fine-tunes and the sweep")] = Path("safemerge-demo"),
    seeds: Annotated[int, typer.Option(help="fine-tuning seeds (2 or more, so model_stock runs)")] = 2,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild the tiny aligned model instead of taking it from the cache")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    debug: DebugOpt = False,
):
    """The whole loop on a laptop CPU: a tiny aligned model, fine-tuned on a benign task, merged back, with a report."""
    from safemerge.demo.numerics import can_pin, is_pinned, run_pinned
    from safemerge.demo.run import print_summary, run_demo

    if can_pin() and not is_pinned():  # the numeric settings are read when torch loads: start again with them
        raise typer.Exit(run_pinned(sys.argv[1:]))
    quiet_libraries()
    if seeds < 1:
        guarded(debug, raise_config, "--seeds must be at least 1 (2 or more so that model_stock runs)")
    result = guarded(debug, run_demo, out, seeds=seeds, rebuild=rebuild, progress=not quiet, echo=typer.echo)
    print_summary(result)


def raise_config(message: str) -> None:
    from safemerge.errors import ConfigError

    raise ConfigError(message)


def parse_ints(text: str, flag: str) -> list[int]:
    from safemerge.errors import ConfigError

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
    from safemerge.merging.methods import METHODS

    for m in METHODS.values():
        takes = ", ".join(sorted({"lam": "lambda", "density": "density", "draws": "seed"}[t] for t in m.parameters)) or "no parameters"
        typer.echo(f"{m.name:16} {m.summary}  [{takes}; {m.paper}]")


def guarded(debug: bool, fn, *args, **kwargs):
    """Run a library call; a SafemergeError becomes one line on stderr and exit code 1."""
    from safemerge.errors import SafemergeError

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
