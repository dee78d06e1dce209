"""`safemerge evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safemerge.cli.options import (
    AllowCode,
    AllowPickle,
    BatchSize,
    Debug,
    Device,
    Force,
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
    eval_default,
    invoked_as,
    parse_numbers,
    quiet_libraries,
)
from safemerge.config import EvalConfig

EXAMPLES = """
Examples:

  safemerge evaluate ./merged --out ./eval --safety advbench:harmful_behaviors.csv --task gsm8k:test.jsonl --limit 50

  safemerge evaluate ./merged --out ./eval --safety advbench --safety hexphi:./HEx-PHI --judge wildguard --device cuda

  safemerge evaluate ./sft --out ./eval --task humaneval --samples 20 --pass-k 1,10 --allow-code-execution
"""
D = eval_default


def evaluate(
    model: Annotated[str, typer.Argument(help="model directory, Hub id or LoRA adapter to evaluate")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for results.json, responses and judgements")],
    safety: Safety = None,
    judge: Judge = D("judge"),
    task: Annotated[list[str] | None, typer.Option(help="task (repeatable): gsm8k[:PATH], bbh:PATH[:TASK], file:PATH[:SCORER], humaneval[:PATH], lm-eval:TASK")] = None,
    system_prompt: SystemPrompt = D("system_prompt"),
    thinking: Thinking = D("thinking"),
    max_new_tokens: MaxNewTokens = D("max_new_tokens"),
    stop_when_decided: Annotated[bool, typer.Option("--stop-when-decided", help="end a safety response once its verdict is fixed: "
                                                    "a refusal keyword appeared (keyword and compliance judges), or an XSTest "
                                                    "opening decided its rule (faster, responses cut short)")] = False,
    judge_prefix_tokens: JudgePrefixTokens = None,
    repetition_penalty: RepetitionPenalty = D("repetition_penalty"),
    task_repetition_penalty: TaskRepetitionPenalty = D("task_repetition_penalty"),
    batch_size: BatchSize = D("batch_size"),
    backend: Annotated[str, typer.Option(help="transformers, or vllm (GPU; pip install 'safemerge[vllm]')")] = D("backend"),
    tensor_parallel_size: TensorParallel = D("tensor_parallel_size"),
    gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the model's engine takes")] = D("gpu_memory_utilization"),
    judge_gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the judge's engine takes (after the model's is shut down)")] = D("judge_gpu_memory_utilization"),
    limit: Limit = None,
    device: Device = D("device"),
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), bfloat16, float16 or float32")] = D("dtype"),
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template for a model that has none")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="generation cache (default $SAFEMERGE_CACHE or ~/.cache/safemerge)")] = None,
    allow_code_execution: AllowCode = False,
    samples: Annotated[int, typer.Option(help="HumanEval completions per problem (n of pass@k)")] = D("samples"),
    temperature: Annotated[float, typer.Option(help="HumanEval sampling temperature when --samples > 1")] = D("temperature"),
    pass_k: Annotated[str, typer.Option(help="k values of pass@k, comma separated")] = "1",
    lm_eval_include: Annotated[Path | None, typer.Option(help="folder of your own lm-evaluation-harness task YAMLs")] = None,
    bertscore_model: Annotated[str, typer.Option(help="BERTScore model (file:PATH:bertscore tasks)")] = D("bertscore_model"),
    bertscore_layer: Annotated[int, typer.Option(help="BERTScore layer")] = D("bertscore_layer"),
    seed: Annotated[int, typer.Option(help="sampling seed")] = D("seed"),
    force: Force = False,
    allow_pickle: AllowPickle = False,
    quiet: QuietAll = False,
    debug: Debug = False,
):
    """Measure MODEL's attack success rate on harmful prompts and its score on tasks."""
    from safemerge.evaluation.console import print_summary
    from safemerge.evaluation.run import evaluate as run_evaluate

    quiet_libraries()
    # every other option is the EvalConfig field of the same name
    options = {k: v for k, v in locals().items() if k in EvalConfig.model_fields
               and k not in ("model", "out", "safety", "pass_k")}
    result = run_evaluate(model, out, safety=safety or [], tasks=task or [], pass_k=parse_numbers(pass_k, "--pass-k", int),
                          progress=not quiet, invoked_as=invoked_as(), **options)
    if not quiet:
        print_summary(result.results)
    typer.echo(f"wrote {result.out}/results.json")
