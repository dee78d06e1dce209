"""`safemerge evaluate`: generate responses to safety prompts and task items, judge and score
them, and write results.json with every setting and a 95% interval for every metric.

Everything that can be checked without a model (sets, tasks, judge spec, flags) is checked
first. Generations of the evaluated model all happen before a judge model is loaded, so the
two never share a GPU's memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from safemerge.backends.generation import (
    Backend,
    CachedBackend,
    Completion,
    GenerationSettings,
    Request,
    TransformersBackend,
    answer_of,
)
from safemerge.config import EvalConfig, EvalSettings, validate
from safemerge.errors import ConfigError
from safemerge.evaluation import judges as judging
from safemerge.evaluation.console import progress_bar
from safemerge.evaluation.prompts import PromptSet, is_xstest, load_safety_set
from safemerge.evaluation.rates import safety_summary, xstest_summary
from safemerge.evaluation.stats import Estimate
from safemerge.evaluation.tasks.base import Task, TaskScore
from safemerge.evaluation.tasks.registry import load_task


@dataclass
class EvalPlan:
    """What will be evaluated: every set and task loaded and checked, no model yet."""

    safety: dict[str, PromptSet]
    tasks: dict[str, Task]
    lm_eval: list[str]  # harness task names, run on the live model
    judge_spec: str
    decided_by: tuple[str, ...] = ()  # the judge's: once one appears in a response, its verdict is fixed
    labels_refusals: bool = False  # the judge's verdicts carry a refusal label (else XSTest's own rule judges XSTest)


@dataclass
class Measured:
    """One model's generations, judgements and scores, in the shape results.json holds them."""

    safety: dict[str, dict] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)  # file name -> JSONL rows
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    out: Path
    results: dict


def evaluate(model: str, out: str | Path, *, progress: bool = True, invoked_as: str | None = None,
             **options) -> EvalResult:
    """Evaluate MODEL (a directory, Hub id or LoRA adapter); see EvalConfig for the options."""
    cfg = validate(EvalConfig, model=model, out=out, **options)
    return run(cfg, progress=progress, invoked_as=invoked_as)


def run(cfg: EvalConfig, *, progress: bool = True, invoked_as: str | None = None) -> EvalResult:
    """Evaluate as CFG says. progress=False prints nothing: no bar of safemerge's, none of the libraries'."""
    from safemerge.progress import libraries_silenced

    with nullcontext() if progress else libraries_silenced():
        return run_evaluation(cfg, progress=progress, invoked_as=invoked_as)


def run_evaluation(cfg: EvalConfig, *, progress: bool, invoked_as: str | None) -> EvalResult:
    from safemerge.backends.models import pick_device
    from safemerge.checkpoints.writer import atomic_directory, check_out

    check_out(cfg.out, cfg.force)
    device = pick_device(cfg.device)
    plan = prepare(cfg, device)
    started = time.perf_counter()
    backend, model_record = evaluated_backend(cfg, device)
    with progress_bar(progress) as bar:
        measured = generate_and_score(backend, plan, cfg, bar)
        release(backend)  # free the evaluated model before a judge model is loaded
        del backend
        judge = build_judge(plan.judge_spec, cfg, device)
        judge_all(measured, plan, judge, bar)
    results = results_record(cfg, plan, model_record, measured, judge, invoked_as)
    results["seconds"]["total"] = round(time.perf_counter() - started, 3)
    with atomic_directory(cfg.out, cfg.force) as tmp:
        write_outputs(tmp, results, measured.records)
    return EvalResult(cfg.out, results)


def evaluated_backend(cfg: EvalConfig, device: str) -> tuple[Backend, dict]:
    """The backend that generates with MODEL, and what results.json records of it."""
    if cfg.backend == "vllm":
        backend, fingerprint = vllm_backend(cfg, cfg.model, judge=False)
        record = {"dtype": cfg.dtype, "chat_template": str(cfg.chat_template) if cfg.chat_template else "model"}
    else:
        from safemerge.backends.models import load_model

        loaded = load_model(cfg.model, device=device, dtype=cfg.dtype, chat_template=cfg.chat_template,
                            allow_pickle=cfg.allow_pickle)
        backend = TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint,
                                      batch_size=cfg.batch_size)
        fingerprint, record = loaded.fingerprint, {"dtype": loaded.dtype, "chat_template": loaded.chat_template}
    return backend, {"spec": cfg.model, "fingerprint": fingerprint, "backend": backend.name, "device": device,
                     "precision": backend.precision, **record, "system_prompt": getattr(backend, "system_mode", None)}


def resolve_judge(spec: str, device: str) -> str:
    """The judge "auto" stands for: keyword on the CPU, WildGuard on a GPU."""
    return spec if spec != "auto" else ("keyword" if device == "cpu" else "wildguard")


def release(backend: Backend) -> None:
    """Free a backend's model now: an engine (vLLM) is shut down, a transformers model is dropped."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def vllm_backend(cfg: EvalConfig, spec: str, judge: bool):
    """A vLLM engine on a model directory, or on a LoRA adapter's base with the adapter as a request."""
    from safemerge.backends.vllm import VllmBackend, lora_rank_slot
    from safemerge.checkpoints.lora import LoraAdapter
    from safemerge.checkpoints.readers import open_source, resolve
    from safemerge.checkpoints.scaled_lora import adapter_rank

    source = open_source(spec, allow_pickle=False)
    options = {"tensor_parallel_size": cfg.tensor_parallel_size, "dtype": cfg.dtype, "seed": cfg.seed,
               "gpu_memory_utilization": cfg.judge_gpu_memory_utilization if judge else cfg.gpu_memory_utilization,
               "chat_template": None if judge else cfg.chat_template, "require_chat_template": not judge}
    if isinstance(source, LoraAdapter):
        base = open_source(source.config["base_model_name_or_path"])
        fingerprint = f"{base.fingerprint()}+lora:{source.fingerprint()}"
        engine = VllmBackend(str(base.path), model_id=base.fingerprint(), enable_lora=True,
                             max_lora_rank=lora_rank_slot(adapter_rank(source.path)), max_loras=1, **options)
        return engine.for_lambda(source.path, 1.0, model_id=fingerprint, scratch=cache_root(cfg) / "lora"), fingerprint
    fingerprint = source.fingerprint()
    return VllmBackend(str(resolve(spec)), model_id=fingerprint, **options), fingerprint


def prepare(cfg: EvalConfig, device: str) -> EvalPlan:
    safety = unique_names((s.limit(cfg.limit) if cfg.limit else s) for s in map(load_safety_set, cfg.safety))
    tasks, lm_eval = [], []
    for spec in cfg.tasks:
        if spec.startswith("lm-eval:"):
            lm_eval.append(spec.removeprefix("lm-eval:"))
            continue
        task = load_task(spec, **task_options(cfg), bertscore_device=device)
        tasks.append(task if not cfg.limit else limit_task(task, cfg.limit))
    if lm_eval:
        from safemerge.evaluation.tasks.lm_eval import check_tasks

        check_tasks(lm_eval, str(cfg.lm_eval_include) if cfg.lm_eval_include else None)
    judge_spec = resolve_judge(cfg.judge, device)
    judge = judging.make_judge(judge_spec, lambda spec: None) if safety else None  # check the spec; models load later
    return EvalPlan(safety, unique_names(tasks), lm_eval, judge_spec, getattr(judge, "decided_by", ()),
                    getattr(judge, "labels_refusals", False))


def task_options(cfg: EvalSettings) -> dict:
    return {"samples": cfg.samples, "temperature": cfg.temperature, "ks": tuple(cfg.pass_k),
            "allow_code_execution": cfg.allow_code_execution, "bertscore_model": cfg.bertscore_model,
            "bertscore_layer": cfg.bertscore_layer}


def limit_task(task: Task, n: int) -> Task:
    from dataclasses import replace

    return replace(task, items=task.items[:n])


def unique_names(items) -> dict:
    named: dict = {}
    for item in items:
        name, k = item.name, 2
        while name in named:
            name, k = f"{item.name}#{k}", k + 1
        named[name] = item
    return named


def safety_settings(cfg: EvalConfig, plan: EvalPlan, set_name: str) -> GenerationSettings:
    """The paper's safety generation, cut short where the verdict needs no more (--stop-when-decided; not with
    reasoning, which the judge does not read): at a decisive string of a text judge, or, on XSTest judged by its
    own rule, once the opening decides it (transformers; vLLM has no such stop and generates in full). A model
    judge reads a prefix only when asked (--judge-prefix-tokens)."""
    stop = cfg.stop_when_decided and cfg.thinking == "off"
    xstest_rule = is_xstest(set_name) and not plan.labels_refusals
    longest = cfg.max_new_tokens
    if cfg.judge_prefix_tokens and judging.is_model_judge(plan.judge_spec):
        longest = min(longest, cfg.judge_prefix_tokens)
    return GenerationSettings(
        max_new_tokens=longest, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
        stop_strings=plan.decided_by if stop and not is_xstest(set_name) else (),
        stop_openings=judging.XSTEST_REFUSAL_PREFIXES if stop and xstest_rule and cfg.backend == "transformers" else ())


def task_settings(cfg: EvalConfig, task: Task) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": cfg.max_new_tokens, "repetition_penalty": cfg.task_repetition_penalty,
                                 "seed": cfg.seed, **task.generation})


def generate_and_score(backend: Backend, plan: EvalPlan, cfg: EvalConfig, bar: Callable[[str, int], Callable]) -> Measured:
    """Generate every response (safety sets and tasks), score the tasks; judging comes later."""
    cached = generation_cache(backend, cfg)
    jobs = generation_jobs(plan, cfg)
    measured = Measured()
    for name, pset in plan.safety.items():
        requests, settings = jobs[name]
        hits = cached.hits
        completions = timed(measured, f"generate/{name}", generate, cached, requests, settings, bar(f"generate {name}", len(requests)))
        measured.safety[name] = {"source": pset.source, "sha256": pset.sha256, "n": len(pset.prompts),
                                 "generation": settings.model_dump(), "cache_hits": cached.hits - hits,
                                 "completions": completions}
        measured.records[f"responses/{slug(name)}.jsonl"] = [
            response_row(c, p.text) for p, c in zip(pset.prompts, completions)]
    for name, task in plan.tasks.items():
        requests, settings = jobs[name]
        hits = cached.hits
        completions = timed(measured, f"generate/{name}", generate, cached, requests, settings, bar(f"generate {name}", len(requests)))
        by_item = [completions[i * settings.num_samples:(i + 1) * settings.num_samples] for i in range(len(task.items))]
        score = timed(measured, f"score/{name}", task.scorer.score, task.items,
                      [[answer_of(c.response) for c in cs] for cs in by_item])
        measured.tasks[name] = task_record(task, score, settings) | {"responses": f"responses/{slug(name)}.jsonl",
                                                                      "cache_hits": cached.hits - hits}
        measured.records[f"responses/{slug(name)}.jsonl"] = [
            response_row(c, it.prompt) | item for it, cs, item in zip(task.items, by_item, score.per_item) for c in cs]
    for name in plan.lm_eval:
        record, per_item = timed(measured, f"lm-eval/{name}", lm_eval_record, backend, name, cfg)
        measured.tasks[f"lm-eval:{name}"] = record | {"responses": f"responses/lm-eval_{slug(name)}.jsonl"}
        measured.records[f"responses/lm-eval_{slug(name)}.jsonl"] = per_item
    return measured


def generation_jobs(plan: EvalPlan, cfg: EvalConfig) -> dict[str, tuple[list[Request], GenerationSettings]]:
    """Every generation an evaluation asks of a model, by set or task name: its requests and settings."""
    jobs = {}
    thinking = cfg.thinking == "on"
    for name, pset in plan.safety.items():
        jobs[name] = ([Request(p.id, messages=({"role": "user", "content": p.text},), system=cfg.system_prompt,
                               thinking=thinking) for p in pset.prompts], safety_settings(cfg, plan, name))
    for name, task in plan.tasks.items():
        system = cfg.system_prompt if task.system_prompt else None
        jobs[name] = ([Request(it.id, messages=({"role": "user", "content": it.prompt},), system=system,
                               thinking=thinking) for it in task.items], task_settings(cfg, task))
    return jobs


def generation_cache(backend: Backend, cfg: EvalConfig) -> CachedBackend:
    return CachedBackend(backend, cache_root(cfg) / "generations")


def generate(backend: Backend, requests: list[Request], settings: GenerationSettings, advance) -> list[Completion]:
    return backend.generate(requests, settings, on_batch=lambda batch: advance(len({c.id for c in batch})))


def timed(measured: Measured, key: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    measured.seconds[key] = round(time.perf_counter() - start, 3)
    return result


def task_record(task: Task, score: TaskScore, settings: GenerationSettings) -> dict:
    digest = hashlib.sha256(json.dumps([[it.id, it.prompt, it.reference] for it in task.items]).encode()).hexdigest()
    return {"source": task.source, "sha256": digest, "n": len(task.items), "scorer": task.scorer.name,
            "primary": score.primary, "metrics": score.metrics, "generation": settings.model_dump()}


def lm_eval_record(backend: Backend, name: str, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """The harness drives the live model itself (its own prompts, few-shot and batching)."""
    from safemerge.evaluation.tasks.lm_eval import run_lm_eval

    if not isinstance(backend, TransformersBackend):
        raise ConfigError(f"lm-eval:{name} runs on a transformers model; the {backend.name} backend cannot run it")
    include = str(cfg.lm_eval_include) if cfg.lm_eval_include else None
    score = run_lm_eval(backend.model, backend.tokenizer, [name], limit=cfg.limit, batch_size=cfg.batch_size,
                        include_path=include, seed=cfg.seed)[name]
    record = {"source": "lm-evaluation-harness", "n": score.metrics[score.primary].n, "scorer": "lm-eval",
              "primary": score.primary, "metrics": score.metrics}
    return record, score.per_item


def response_row(c: Completion, prompt: str) -> dict:
    """The user's text and the prompt exactly as the model saw it (chat template applied), the full
    response (reasoning included) and, when it differs, the answer the judge or scorer read."""
    row = {"id": c.id, "sample": c.sample, "prompt": prompt, "rendered_prompt": c.prompt, "response": c.response}
    answer = answer_of(c.response)
    if answer != c.response:
        row["answer"] = answer
    return row | {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}


def build_judge(spec: str, cfg: EvalConfig, device: str) -> judging.Judge:
    from safemerge.backends.models import load_model

    def backend_for(model_spec: str) -> Backend:
        if cfg.backend == "vllm":
            return CachedBackend(vllm_backend(cfg, model_spec, judge=True)[0], cache_root(cfg) / "judgements")
        loaded = load_model(model_spec, device=device, dtype=cfg.dtype, require_chat_template=False,
                            allow_pickle=cfg.allow_pickle)
        inner = TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint, batch_size=cfg.batch_size)
        return CachedBackend(inner, cache_root(cfg) / "judgements")

    return judging.make_judge(spec, backend_for)


def judge_all(measured: Measured, plan: EvalPlan, judge: judging.Judge, bar) -> None:
    for name, pset in plan.safety.items():
        record = measured.safety[name]
        completions = record.pop("completions")
        verdict_judge = judge
        if is_xstest(pset.name) and not getattr(judge, "labels_refusals", False):
            # over-refusal needs a refusal label: XSTest's own rule unless the judge gives one
            verdict_judge = judging.XSTestKeywordJudge()
        advance = bar(f"judge {name}", len(completions))
        verdicts = timed(measured, f"judge/{name}", verdict_judge.judge, [p.text for p in pset.prompts],
                         [answer_of(c.response) for c in completions])
        advance(len(completions))
        if is_xstest(pset.name):
            record.update(xstest_summary([p.label for p in pset.prompts], verdicts))
        else:
            categories = [p.category for p in pset.prompts]
            record.update(safety_summary(verdicts, categories if any(categories) else None))
        record["judge"] = verdict_judge.name
        record["responses"] = f"responses/{slug(name)}.jsonl"
        record["judgements"] = f"judgements/{slug(name)}.jsonl"
        measured.records[record["judgements"]] = [{"id": c.id} | v.to_dict() for c, v in zip(completions, verdicts)]


def results_record(cfg: EvalConfig, plan: EvalPlan, model: dict, measured: Measured, judge, invoked_as) -> dict:
    from safemerge.merging.card import version

    return jsonable({
        "safemerge_version": version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": invoked_as,
        "config": cfg.model_dump(mode="json"),
        "model": model,
        "judge": {"spec": plan.judge_spec, "name": judge.name, "model": judge.model, "settings": judge.settings},
        "safety": measured.safety,
        "tasks": measured.tasks,
        "seconds": dict(measured.seconds),
        "versions": package_versions(),
    })


def jsonable(value):
    """Estimates as dicts, NaN (a rate of nothing) as null: results.json stays strict JSON."""
    if isinstance(value, Estimate):
        return jsonable(value.to_dict())
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("safemerge", "torch", "transformers", "peft", "tokenizers", "bert-score", "lm-eval", "vllm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_outputs(directory: Path, results: dict, records: dict[str, list[dict]], name: str = "results.json") -> None:
    from safemerge.checkpoints.writer import write_file

    for relative, rows in records.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, "".join(json.dumps(jsonable(r), ensure_ascii=False) + "\n" for r in rows))
    write_file(directory / name, json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def cache_root(cfg: EvalConfig) -> Path:
    """--cache-dir, else $SAFEMERGE_CACHE, else the XDG user cache directory."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("SAFEMERGE_CACHE"):
        return Path(os.environ["SAFEMERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safemerge"
