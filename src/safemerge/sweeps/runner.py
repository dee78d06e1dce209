"""Running one trial: its weights set in place on the loaded model, evaluated, recorded."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from safemerge.backends.generation import TransformersBackend
from safemerge.config import SweepConfig
from safemerge.evaluation.run import (
    EvalPlan,
    Measured,
    build_judge,
    generate_and_score,
    generation_cache,
    generation_jobs,
    jsonable,
    judge_all,
    release,
)
from safemerge.merging.inplace import LiveMerger
from safemerge.sweeps import adaptive
from safemerge.sweeps import choose as choosing
from safemerge.sweeps.trials import Trial, sweep_plan


class LiveTrialModels:
    """The transformers path: the aligned model in memory, each trial's weights set in place by the
    merge stream that `safemerge merge` runs (bit for bit its output, same content fingerprint)."""

    def __init__(self, cfg: SweepConfig, device: str):
        from safemerge.backends.models import load_model

        self.cfg = cfg
        self.live = load_model(cfg.aligned, device=device, dtype=cfg.evaluation.dtype, chat_template=cfg.evaluation.chat_template,
                               allow_pickle=cfg.evaluation.allow_pickle)
        self.merger = LiveMerger(self.live.model)

    def order(self, trials: list[Trial]) -> list[Trial]:
        return trials

    def prefetch(self, trials, jobs, cache) -> int:
        """Nothing to share: one model is in memory at a time."""
        return 0

    def backend(self, trial: Trial) -> tuple[TransformersBackend, str]:
        fingerprint = self.merger.merge(trial.merge_config(self.cfg, self.cfg.out / "merged"))
        return TransformersBackend(self.live.model, self.live.tokenizer, model_id=fingerprint,
                                   batch_size=self.cfg.evaluation.batch_size), fingerprint

    def close(self) -> None:
        self.live = self.merger = None


class TrialRunner:
    """What one process needs to run trials, loaded once: the trial models' source (the aligned
    model in memory, or vLLM engines), the evaluation plan and the judge."""

    def __init__(self, cfg: SweepConfig, status: Callable[[str], None] = lambda text: None, judge=None):
        """``judge``: a judge held elsewhere (a shared Ray actor); by default one is built here."""
        from safemerge.backends.models import pick_device

        self.cfg = cfg
        self.eval_cfg = cfg.eval_config()
        self.device = pick_device(cfg.evaluation.device)
        self.plan = sweep_plan(cfg, self.device)
        if cfg.evaluation.backend == "vllm":
            from safemerge.sweeps.vllm import VllmTrialModels

            self.models = VllmTrialModels(cfg)
        else:
            self.models = LiveTrialModels(cfg, self.device)
        self.judge = judge
        self.status = status

    def prepare(self, items: list[tuple[Trial, str]], log: Callable[[str], None],
                sequential: bool = False) -> list[tuple[Trial, str]]:
        """The order to run these trials in; the generations they can share are made now, unless merges are
        judged look by look (``sequential``): then a merge generates only what its looks ask for."""
        order = {trial: k for k, trial in enumerate(self.models.order([t for t, _ in items]))}
        items = sorted(items, key=lambda item: order[item[0]])
        if sequential and any(t.kind == "merge" for t, _ in items):
            return items
        self.status(f"generating for {len(items)} trials")
        started = time.perf_counter()
        shared = self.models.prefetch([t for t, _ in items], generation_jobs(self.plan, self.eval_cfg),
                                      lambda backend: generation_cache(backend, self.eval_cfg))
        if shared:
            log(f"generated for {shared} trials in shared engine calls in {time.perf_counter() - started:.1f}s")
        return items

    def run(self, trial: Trial, reference: dict[str, str] | None = None) -> tuple[dict, Measured]:
        """``reference``: the aligned model's selection verdicts by set; given, a merge is judged look by look."""
        started = time.perf_counter()
        self.status(f"{trial.label}: merging")
        backend, fingerprint = self.models.backend(trial)
        merged = time.perf_counter()
        measured, rest = Measured(), self.plan
        if reference is not None and trial.kind == "merge":
            self.status(f"{trial.label}: judging the selection prompts look by look")
            rest = self.judged_in_looks(backend, reference, measured)
        if rest is not None:
            self.status(f"{trial.label}: generating")
            more = generate_and_score(backend, rest, self.eval_cfg, lambda description, total: lambda n: None)
            self.status(f"{trial.label}: judging")
            judge_all(more, rest, self.get_judge(), lambda description, total: lambda n: None)
            absorb(measured, more)
        seconds = {"merge": merged - started,
                   **{part: sum(v for k, v in measured.seconds.items() if k.startswith(f"{part}/"))
                      for part in ("generate", "judge", "score")},
                   "total": time.perf_counter() - started}
        seconds["generate"] -= seconds["score"]  # scoring happens inside generate_and_score
        generated_by = f"{backend.name} {backend.precision}"
        system_prompt = getattr(backend, "system_mode", None)
        return trial_record(trial, fingerprint, generated_by, system_prompt, measured, seconds), measured

    def get_judge(self):
        if self.judge is None:
            self.judge = build_judge(self.plan.judge_spec, self.eval_cfg, self.device)
        return self.judge

    def judged_in_looks(self, backend, reference: dict[str, str], measured: Measured) -> EvalPlan | None:
        """Each harmful selection part judged look by look; what remains to evaluate in full (the report
        parts, XSTest and the tasks) when every test passed, None when one failed."""
        names = adaptive.sequential_sets(self.plan, reference)
        for name in names:
            if adaptive.run_looks(backend, self.plan, self.eval_cfg, self.get_judge(), name, reference[name], self.cfg,
                                  measured) == "fail":
                return None
        return replace(self.plan, safety={k: v for k, v in self.plan.safety.items() if k not in names})

    def close(self) -> None:
        """Free the models (engines are shut down), and the judge's."""
        self.models.close()
        judge_backend = getattr(self.judge, "backend", None)
        if judge_backend is not None:
            release(getattr(judge_backend, "backend", judge_backend))  # inside its cache
        self.judge = None


def absorb(measured: Measured, more: Measured) -> None:
    measured.safety.update(more.safety)
    measured.tasks.update(more.tasks)
    measured.records.update(more.records)
    for key, seconds in more.seconds.items():
        measured.seconds[key] = round(measured.seconds.get(key, 0.0) + seconds, 3)


def reference_verdicts(aligned: dict) -> dict[str, str | None]:
    """The aligned record's selection verdicts, by the plan's set names, for adaptive merges."""
    return {f"{name}/selection": choosing.selection_part(aligned, name).get("verdicts")
            for name in choosing.asr_sets(aligned)}


def trial_record(trial: Trial, fingerprint: str, generated_by: str, system_prompt: str | None, measured: Measured,
                 seconds: dict) -> dict:
    """``system_prompt``: how the chat template placed it (see backends.generation.system_prompt_mode)."""
    safety: dict[str, dict] = {}
    for name, record in measured.safety.items():
        base, part = name.rsplit("/", 1)
        kept = {k: v for k, v in record.items() if k not in ("generation", "source", "responses", "judgements")}
        if not base.startswith("xstest") and "verdicts" not in kept:  # the paired test compares them prompt by prompt
            kept["verdicts"] = choosing.verdict_string(measured.records[record["judgements"]])
        safety.setdefault(base, {})[part] = kept
    tasks: dict[str, dict] = {"val": {}, "test": {}}
    for name, record in measured.tasks.items():
        role, task = name.split("/", 1)
        tasks[role][task] = {"primary": record["primary"], "metrics": record["metrics"], "n": record["n"]}
    record = {"kind": trial.kind, "method": trial.method, "lam": trial.lam, "density": trial.density, "seed": trial.seed,
              "finetuned": list(trial.finetuned), "label": trial.label, "fingerprint": fingerprint,
              "generated_by": generated_by, "safety": safety, "tasks": tasks, "val_score": mean_primary(tasks["val"]),
              "test_score": mean_primary(tasks["test"]), "seconds": {k: round(v, 3) for k, v in seconds.items()},
              "system_prompt": system_prompt}
    return jsonable(record)


def mean_primary(tasks: dict[str, dict]) -> float | None:
    values = [t["metrics"][t["primary"]].value for t in tasks.values()]
    if not values or any(v is None or math.isnan(v) for v in values):
        return None
    return math.fsum(values) / len(values)
