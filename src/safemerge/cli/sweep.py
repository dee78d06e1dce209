"""`safemerge sweep`, `safemerge run CONFIG.yaml` and `safemerge report RUN`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safemerge.cli.options import (
    Adaptive,
    AllowCode,
    AllowPickle,
    BatchSize,
    Debug,
    Device,
    Judge,
    Limit,
    JudgePrefixTokens,
    MaxNewTokens,
    QuietAll,
    RepetitionPenalty,
    Safety,
    SystemPrompt,
    TaskRepetitionPenalty,
    TensorParallel,
    Thinking,
    invoked_as,
    parse_list,
    parse_numbers,
    quiet_libraries,
    read_yaml,
    sweep_default,
)
from safemerge.config import SweepConfig

EXAMPLES = """
Examples:

  safemerge sweep --aligned meta-llama/Meta-Llama-3-8B-Instruct --finetuned ./seed0 ./seed1 ./seed2 --out ./run
                  --safety advbench --judge wildguard --task-val gsm8k:val.jsonl --task-test gsm8k:test.jsonl

  safemerge sweep --aligned ./aligned --finetuned ./sft-lora --out ./run --methods linear,slerp --search bisect
                  --safety advbench:harmful_behaviors.csv --task-val file:val.jsonl:exact
"""
D = sweep_default


def sweep(
    aligned: Annotated[str, typer.Option(help="the safety-aligned model: a directory or a Hub id")],
    finetuned: Annotated[list[str], typer.Option(help="fine-tuned model or LoRA adapter; several (seeds of one fine-tuning) may follow")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory: trials, results.json, report, merged/")],
    more_finetuned: Annotated[list[str] | None, typer.Argument(help="more fine-tuned seeds", show_default=False)] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated merge methods (default linear,slerp,dare_linear,ties and model_stock with ≥ 2 seeds)")] = None,
    lambdas: Annotated[str, typer.Option(help="comma-separated λ grid, strictly between 0 and 1")] = ",".join(f"{x:g}" for x in D("lambdas")),
    search: Annotated[str, typer.Option(help="grid, or bisect: per method the largest λ meeting the safety constraint")] = D("search"),
    tolerance: Annotated[float, typer.Option(help="bisection and refinement tolerance on λ")] = D("tolerance"),
    refine: Annotated[bool, typer.Option("--refine/--no-refine", help="grid: then bisect each method between its largest passing λ and the next one tried, to the tolerance")] = D("refine"),
    policy: Annotated[str, typer.Option(help="constrained (best validation score within the ASR bound) or paper (best validation score)")] = D("policy"),
    max_asr_increase: Annotated[float, typer.Option(help="constrained: allowed rise of ASR over the aligned model's (paired test: one-sided 95% upper bound of the difference on the same prompts)")] = D("max_asr_increase"),
    density: Annotated[float | None, typer.Option(help="ties/dare density (default 0.5)")] = None,
    merge_seed: Annotated[int, typer.Option(help="seed of the DARE drop masks")] = D("merge_seed"),
    merge_dtype: Annotated[str, typer.Option(help="dtype of the merged weights: auto (the aligned model's), bfloat16, float16, float32")] = D("merge_dtype"),
    safety: Safety = None,
    selection_fraction: Annotated[float, typer.Option(help="part of each safety set used to choose; the rest is reported")] = D("selection_fraction"),
    judge: Judge = D("judge"),
    task_val: Annotated[list[str] | None, typer.Option(help="validation task (repeatable): its score chooses λ")] = None,
    task_test: Annotated[list[str] | None, typer.Option(help="test task (repeatable): reported")] = None,
    keep: Annotated[str, typer.Option(help="merged models to write: chosen, all or none")] = D("keep"),
    executor: Annotated[str, typer.Option(help="local (this process) or ray (pip install 'safemerge[ray]')")] = D("executor"),
    address: Annotated[str | None, typer.Option(help="ray: the cluster to join, e.g. auto or HOST:PORT (default: a local instance)")] = None,
    gpus_per_trial: Annotated[float, typer.Option(help="ray: GPUs per worker (each runs one trial at a time)")] = D("gpus_per_trial"),
    num_workers: Annotated[int | None, typer.Option(help="ray: number of workers (default: as many as fit)")] = None,
    judge_placement: Annotated[str, typer.Option(help="ray: worker (a judge model in every worker) or shared (one judge actor for all)")] = D("judge_placement"),
    judge_gpus: Annotated[float, typer.Option(help="ray, --judge-placement shared: GPUs of the judge actor")] = D("judge_gpus"),
    backend: Annotated[str, typer.Option(help="transformers, or vllm (GPU; pip install 'safemerge[vllm]'): a LoRA fine-tune's linear merges are served as λ-scaled adapters of one engine")] = D("backend"),
    tensor_parallel_size: TensorParallel = D("tensor_parallel_size"),
    gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the trial model's engine takes")] = D("gpu_memory_utilization"),
    judge_gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the judge's engine takes (both stay loaded)")] = D("judge_gpu_memory_utilization"),
    system_prompt: SystemPrompt = D("system_prompt"),
    thinking: Thinking = D("thinking"),
    max_new_tokens: MaxNewTokens = D("max_new_tokens"),
    judge_prefix_tokens: JudgePrefixTokens = None,
    adaptive: Adaptive = D("adaptive"),
    repetition_penalty: RepetitionPenalty = D("repetition_penalty"),
    task_repetition_penalty: TaskRepetitionPenalty = D("task_repetition_penalty"),
    batch_size: BatchSize = D("batch_size"),
    limit: Limit = None,
    device: Device = D("device"),
    dtype: Annotated[str, typer.Option(help="dtype the trial models compute in: auto, bfloat16, float16, float32")] = D("dtype"),
    cache_dir: Annotated[Path | None, typer.Option(help="generation cache (default RUN/cache)")] = None,
    allow_code_execution: AllowCode = False,
    allow_pickle: AllowPickle = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (trials, generations, judge calls, a GPU-hour bound) and run nothing")] = False,
    tokens_per_second: Annotated[float, typer.Option(help="--dry-run: ASSUMED generation throughput per GPU, for the GPU-hour bound")] = 2500.0,
    quiet: QuietAll = False,
    debug: Debug = False,
):
    """Merge by every method and λ, evaluate each merge, choose one, and write it with a report."""
    # every other option is the sweep setting of the same (flat) name
    values = {k: v for k, v in locals().items() if k in SweepConfig.flat_fields()}
    values.update(finetuned=[*finetuned, *(more_finetuned or [])], methods=parse_list(methods) if methods else None,
                  lambdas=parse_numbers(lambdas, "--lambdas"), safety=safety or [], task_val=task_val or [],
                  task_test=task_test or [])
    if dry_run:
        print_dry_run(values, tokens_per_second)
    else:
        run_sweep_values(values, quiet)


def run_config(
    config: Annotated[Path, typer.Argument(help="a YAML file with the sweep's settings (the fields of `safemerge sweep`)")],
    quiet: QuietAll = False,
    debug: Debug = False,
):
    """Run a sweep described by one YAML file."""
    run_sweep_values(read_yaml(config), quiet)


def report(
    run: Annotated[Path, typer.Argument(help="a run directory written by `safemerge sweep`")],
    debug: Debug = False,
):
    """Rebuild results.json and the report of RUN from its stored trials (no model is loaded)."""
    from safemerge.sweeps.run import rebuild_report

    print_sweep_summary(rebuild_report(run))
    typer.echo(f"wrote {run}/results.json, {run}/report.md and {run}/report.html")


def run_sweep_values(values: dict, quiet: bool) -> None:
    from safemerge.config import validate
    from safemerge.sweeps.run import sweep as run_sweep

    quiet_libraries()
    result = run_sweep(validate(SweepConfig, **values), progress=not quiet, invoked_as=invoked_as())
    if not quiet:
        print_sweep_summary(result.results)
    typer.echo(f"{result.results['choice']['reason']}")
    typer.echo(f"wrote {result.out}/results.json, report.md and report.html"
               + (f"; the chosen model is in {result.out}/merged" if result.results.get("merged") else ""))


def print_dry_run(values: dict, tokens_per_second: float) -> None:
    from safemerge.config import validate
    from safemerge.sweeps.dry_run import dry_run

    plan = dry_run(validate(SweepConfig, **values), tokens_per_second)
    tasks = ", ".join(f"{k} {v}" for k, v in plan["task_generations_per_trial"].items()) or "none"
    typer.echo(f"trials: {plan['trials']} ({plan['search']}; methods {', '.join(plan['methods'])}; "
               f"λ {', '.join(f'{x:g}' for x in plan['lambdas'])}; {plan['seeds']} seed(s); baselines included"
               + (f"; up to {plan['refinement_trials']} refining λ on the safety boundary" if plan["refinement_trials"] else "")
               + ")")
    typer.echo(f"per trial: {plan['safety_prompts_per_trial']} safety prompts; task generations: {tasks}")
    typer.echo(f"generations: {plan['generations']:,}; judge {plan['judge']}: {plan['judge_calls']:,} model calls")
    typer.echo(f"generated tokens: at most {plan['max_generated_tokens']:,}; at an assumed {tokens_per_second:,.0f} "
               f"tokens/s per GPU that is at most {plan['gpu_hours_upper_bound']:.1f} GPU hours")
    if plan["adaptive"]:
        a = plan["adaptive"]
        typer.echo(f"adaptive, expected: {a['expected_generations_at_margin']:,} generations (at most "
                   f"{a['expected_max_tokens_at_margin']:,} tokens, {a['ratio_at_margin']:.0%} of the exhaustive bound) "
                   f"when every merge sits at the safety margin; {a['expected_generations_if_all_pass']:,} "
                   f"({a['ratio_if_all_pass']:.0%}) when every merge passes. Assumed: {a['assumptions']}")
    if plan["vllm"]:
        v = plan["vllm"]
        typer.echo(f"vllm: {v['lora_trials']} trials served by one engine on the aligned model ({v['lora_adapters']} "
                   f"LoRA fine-tune(s), λ as scaled adapters, shared batches); {v['merged_trials']} merges written to "
                   f"scratch with an engine each; {v['engine_starts']} engine starts")


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
