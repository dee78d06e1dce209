"""Typed, validated settings. Everything is checked here, before any tensor is read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from safemerge.backends.generation import MAX_NEW_TOKENS, SAFETY_REPETITION_PENALTY
from safemerge.errors import ConfigError
from safemerge.evaluation.judges import is_model_judge, judge_name
from safemerge.evaluation.tasks.bertscore import DEFAULT_LAYER as BERTSCORE_LAYER
from safemerge.evaluation.tasks.bertscore import DEFAULT_MODEL as BERTSCORE_MODEL
from safemerge.merging import methods

DEFAULT_LAMBDA = 0.5
DEFAULT_DENSITY = 0.5
DEFAULT_SEED = 42
DEFAULT_SHARD_SIZE = "5GB"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (decimal units as on the Hub)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB or 500MB")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()])


class MergeConfig(BaseModel):
    """One merge: the aligned model, its fine-tuned version(s), the method and the output."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    aligned: str = Field(description="the safety-aligned model: a directory or a Hub id")
    finetuned: list[str] = Field(min_length=1, description="fine-tuned models or LoRA adapters of the aligned one")
    out: Path = Field(description="directory to write the merged model to")
    method: str = Field("linear", description="merge method, see `safemerge methods`")
    lam: float | None = Field(
        None, alias="lambda",
        description=f"λ, the weight of the fine-tuned model: merged = (1-λ)·aligned + λ·finetuned (default {DEFAULT_LAMBDA})",
    )
    density: float | None = Field(
        None, gt=0, le=1, description=f"fraction of each delta kept by ties/dare methods (default {DEFAULT_DENSITY})"
    )
    seed: int = Field(DEFAULT_SEED, ge=0, description="seed of the DARE drop masks")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="output dtype; auto keeps each tensor's dtype in the aligned model"
    )
    shard_size: int = Field(parse_size(DEFAULT_SHARD_SIZE), gt=0, description="largest output shard, in bytes")
    keep_aligned: list[str] = Field(default_factory=list, description="regexes of tensor names copied unchanged from the aligned model")
    force: bool = Field(False, description="replace an existing output directory")
    allow_pickle: bool = Field(False, description="load .bin/.pt checkpoints (with torch.load weights_only=True)")

    @field_validator("lam")
    @classmethod
    def _lambda(cls, v):
        if v is not None and not 0 <= v <= 1:  # also refuses NaN
            raise ValueError(f"λ is the weight of the fine-tuned model and must lie in [0, 1]; got {v}")
        return v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @field_validator("keep_aligned")
    @classmethod
    def _regexes(cls, patterns):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"keep_aligned pattern {p!r} is not a valid regex: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _fits_method(self):
        m = methods.METHODS.get(self.method)
        if m is None:
            raise ValueError(f"unknown method {self.method!r}; available: {', '.join(methods.METHODS)}")
        if len(self.finetuned) < m.min_models:
            raise ValueError(f"{self.method} needs at least {m.min_models} fine-tuned models, got {len(self.finetuned)}")
        if self.lam is not None and "lam" not in m.parameters:
            raise ValueError(f"{self.method} takes no λ (--lambda); it sets the interpolation itself")
        if self.density is not None and "density" not in m.parameters:
            raise ValueError(f"{self.method} takes no density; only ties and dare methods do")
        return self

    @property
    def params(self) -> dict:
        """The method's parameters with defaults filled in: exactly what the merge used."""
        takes = methods.get(self.method).parameters
        params = {}
        if "lam" in takes:
            params["lam"] = DEFAULT_LAMBDA if self.lam is None else self.lam
        if "density" in takes:
            params["density"] = DEFAULT_DENSITY if self.density is None else self.density
        if "draws" in takes:
            params["seed"] = self.seed
        return params


# how the command line spells each field, for messages
FLAGS = {"lam": "--lambda", "lambda": "--lambda", "shard_size": "--shard-size", "keep_aligned": "--keep-aligned",
         "allow_pickle": "--allow-pickle", "aligned": "ALIGNED", "finetuned": "FINETUNED", "model": "MODEL",
         "tasks": "--task", "pass_k": "--pass-k"}


def validate(config_class: type[BaseModel], **values) -> BaseModel:
    """Build a config, turning pydantic's report into one ConfigError line."""
    try:
        return config_class(**values)
    except ValidationError as e:
        parts = []
        spelled = {inner: flat for flat, inner in config_class.flat_fields().items()} \
            if issubclass(config_class, FlatSpelled) else {}
        for err in e.errors():
            loc = [str(x) for x in err["loc"]]
            if tuple(loc[:2]) in spelled:  # a grouped setting: named as the command line spells it
                loc[:2] = [spelled[tuple(loc[:2])]]
            if loc:
                loc[0] = FLAGS.get(loc[0], f"--{loc[0].replace('_', '-')}")
            where = ".".join(loc)
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        raise ConfigError("; ".join(parts)) from None


PAPER_SYSTEM_PROMPT = "You are a helpful assistant."


class EvalSettings(BaseModel):
    """How a model is evaluated: the judge, the generation and the tasks' options. `safemerge evaluate`
    takes them beside its inputs; a sweep holds them under `evaluation` and runs every trial with them.
    The generation defaults are the paper's safety evaluation settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    judge: str = Field("auto", description="keyword[:FILE], wildguard[:MODEL], llamaguard[:MODEL]; auto: keyword on CPU, wildguard on GPU")
    system_prompt: str | None = Field(PAPER_SYSTEM_PROMPT, description="system prompt of every chat request; empty for none")
    thinking: Literal["on", "off"] = Field("off", description="a thinking model's reasoning mode (Qwen3's enable_thinking); "
                                       "the judge and scorers read the answer after </think>")
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    stop_when_decided: bool = Field(False, description="stop a safety response once the judge's verdict cannot change (a refusal "
                                    "keyword appeared, keyword and compliance judges; on XSTest judged by its own rule, once "
                                    "the opening decides it; thinking off); a sweep sets it by --adaptive")
    judge_prefix_tokens: int | None = Field(None, ge=1, description="model judges (WildGuard, Llama Guard): generate and judge "
                                            "only the first N tokens of each safety response")
    repetition_penalty: float = Field(SAFETY_REPETITION_PENALTY, gt=0, description="repetition penalty of the safety generations")
    task_repetition_penalty: float = Field(1.0, gt=0, description="repetition penalty of the task generations (numbers and code repeat tokens)")
    batch_size: int = Field(8, ge=1)
    backend: Literal["transformers", "vllm"] = Field("transformers", description="generation engine (vllm: GPU, optional extra)")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model is split over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of each GPU the evaluated model's engine takes")
    judge_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of each GPU a judge model's engine takes")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts of each set")
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="dtype the evaluated model computes in")
    chat_template: Path | None = Field(None, description="a Jinja chat template for a model that has none")
    cache_dir: Path | None = Field(None, description="where generations are cached (evaluate: the user cache directory; sweep: RUN/cache)")
    allow_code_execution: bool = Field(False, description="run model-written code (HumanEval) in sandboxed subprocesses")
    samples: int = Field(1, ge=1, description="HumanEval completions per problem (n of pass@k)")
    temperature: float = Field(0.8, gt=0, description="HumanEval sampling temperature when samples > 1")
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values of pass@k")
    lm_eval_include: Path | None = Field(None, description="folder of your own lm-evaluation-harness task YAMLs")
    bertscore_model: str = Field(BERTSCORE_MODEL)
    bertscore_layer: int = Field(BERTSCORE_LAYER, ge=1)
    seed: int = 0
    allow_pickle: bool = False

    @field_validator("system_prompt")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None

    @model_validator(mode="after")
    def _pass_k_fits(self):
        if any(k > self.samples for k in self.pass_k):
            raise ValueError(f"pass@k needs k <= --samples ({self.samples}); got --pass-k {','.join(map(str, self.pass_k))}")
        return self


class EvalConfig(EvalSettings):
    """One evaluation: a model's safety on harmful prompts and its score on the user's tasks."""

    model: str = Field(description="model directory, Hub id or LoRA adapter to evaluate")
    out: Path = Field(description="directory for results.json, responses and judgements")
    safety: list[str] = Field(default_factory=list, description="safety prompt sets: advbench[:PATH], hexphi:PATH, xstest[:PATH], file:PATH[:COLUMN]")
    tasks: list[str] = Field(default_factory=list, description="task sets: gsm8k[:PATH], bbh:PATH[:TASK], file:PATH[:SCORER], humaneval[:PATH], lm-eval:TASK")
    force: bool = Field(False, description="replace an existing --out")

    @model_validator(mode="after")
    def _something_to_do(self):
        if not self.safety and not self.tasks:
            raise ValueError("nothing to evaluate: give at least one --safety set or --task")
        return self


class MergeSettings(BaseModel):
    """How a sweep merges. Flat, the seed and dtype are spelled merge_seed and merge_dtype (seed and
    dtype are the evaluation's)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    density: float | None = Field(None, gt=0, le=1, description=f"ties/dare density (default {DEFAULT_DENSITY})")
    seed: int = Field(DEFAULT_SEED, ge=0, alias="merge_seed", description="seed of the DARE drop masks")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", alias="merge_dtype", description="dtype of the merged weights")


class RaySettings(BaseModel):
    """Where a sweep's trials run with --executor ray."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="ray: the cluster to join (default: start a local instance)")
    gpus_per_trial: float = Field(0, ge=0, description="ray: GPUs each worker (one trial at a time) holds")
    cpus_per_trial: float = Field(1, gt=0, description="ray: CPUs each worker holds")
    num_workers: int | None = Field(None, ge=1, description="ray: workers (default: as many as the cluster holds)")
    judge_placement: Literal["worker", "shared"] = Field(
        "worker", description="ray: a judge model in every worker, or one judge actor shared by all workers")
    judge_gpus: float = Field(0, ge=0, description="ray, shared judge: GPUs the judge actor holds")


class FlatSpelled(BaseModel):
    """A config whose settings are grouped in nested models in code and spelled flat everywhere else:
    on the command line, in YAML files, in sweep.json and in records (`max_new_tokens: 64` is
    evaluation.max_new_tokens). The nested spelling (`evaluation: {max_new_tokens: 64}`) is read too."""

    @classmethod
    def groups(cls) -> dict[str, type[BaseModel]]:
        return {name: f.annotation for name, f in cls.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[str | None, str]]:
        """Each flat name -> (its group, or None for a top-level field; its name there)."""
        fields, groups = {}, cls.groups()
        for name in cls.model_fields:
            group = groups.get(name)
            if group is None:
                fields[name] = (None, name)
            else:
                fields.update({f.alias or inner: (name, inner) for inner, f in group.model_fields.items()})
        return fields

    @classmethod
    def flat_default(cls, flat: str):
        """The default of the setting spelled FLAT: the one place it is defined."""
        group, name = cls.flat_fields()[flat]
        field = cls.model_fields[group or name]
        value = field.default_factory() if field.default_factory else field.default
        return getattr(value, name) if group else value

    def updated(self, **flat):
        """A copy with some settings changed (spelled flat), validated again."""
        return type(self)(**{**self.model_dump(), **flat})

    @model_validator(mode="before")
    @classmethod
    def _group(cls, values):
        if not isinstance(values, dict):
            return values
        values, flat_fields = dict(values), cls.flat_fields()
        for group in cls.groups():
            given = values.get(group, {})
            if not isinstance(given, dict):
                continue  # pydantic says what is wrong with it
            field = cls.model_fields[group]
            # the group's own defaults first (a sweep's vLLM memory shares), then what was given
            nested = field.default_factory().model_dump(exclude_unset=True) if field.default_factory else {}
            nested.update(given)
            for flat, (where, name) in flat_fields.items():
                if where == group and flat in values:
                    nested[name] = values.pop(flat)
            values[group] = nested
        return values

    @model_serializer(mode="wrap")
    def _flatten(self, handler):
        spelled = {where: flat for flat, where in self.flat_fields().items()}  # (group, name) -> flat name
        groups, flat = self.groups(), {}
        for key, value in handler(self).items():
            if key in groups and isinstance(value, dict):
                flat.update({spelled.get((key, name), name): v for name, v in value.items()})
            else:
                flat[key] = value
        return flat


DEFAULT_SWEEP_METHODS = ("linear", "slerp", "dare_linear", "ties", "model_stock")
DEFAULT_LAMBDAS = (0.2, 0.4, 0.6, 0.8)


class SweepConfig(FlatSpelled):
    """A sweep: merge the aligned model with its fine-tune(s) by every method and λ, evaluate each
    merge, choose one and write it with a report. Also the schema of `safemerge run CONFIG.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aligned: str = Field(description="the safety-aligned model: a directory or a Hub id")
    finetuned: list[str] = Field(min_length=1, description="fine-tuned models or LoRA adapters; several are seeds of one fine-tuning")
    out: Path = Field(description="the run directory: trials, results.json, report, merged/")
    methods: list[str] | None = Field(None, description="merge methods (default: linear, slerp, dare_linear, ties, and model_stock with ≥ 2 fine-tunes)")
    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS), min_length=1, description="λ grid (weight of the fine-tuned model)")
    search: Literal["grid", "bisect"] = "grid"
    tolerance: float = Field(0.05, gt=0, lt=1, description="bisection and refinement stop when the λ interval is this narrow")
    refine: bool = Field(True, description="grid, constrained policy: then bisect each method between its largest "
                                           "λ that passes the safety test and the next λ tried, to the tolerance")
    policy: Literal["constrained", "paper"] = "constrained"
    max_asr_increase: float = Field(0.02, ge=0, le=1, description="constrained policy: allowed ASR rise over the aligned model")
    merge: MergeSettings = Field(default_factory=MergeSettings)
    safety: list[str] = Field(default_factory=list, min_length=1, description="safety prompt sets (see `safemerge evaluate`)")
    selection_fraction: float = Field(0.5, gt=0, lt=1, description="part of each safety set used to choose; the rest is reported")
    split_seed: int = 0
    task_val: list[str] = Field(default_factory=list, min_length=1, description="tasks whose score chooses λ")
    task_test: list[str] = Field(default_factory=list, description="tasks reported for the chosen merge")
    keep: Literal["chosen", "all", "none"] = Field("chosen", description="which merged models to write")
    executor: Literal["local", "ray"] = Field("local", description="where trials run: this process, or Ray workers")
    adaptive: bool = Field(True, description="spend generation only where the decision needs it: a safety response stops "
                           "once its verdict is fixed, a merge's selection prompts are judged in looks and stop once the "
                           "paired test is decided, and a failing λ prunes the larger ones; --exhaustive runs everything")
    looks: int = Field(4, ge=1, le=20, description="adaptive, constrained policy: looks of the group-sequential paired "
                                                    "test (equal blocks of each selection part)")
    ray: RaySettings = Field(default_factory=RaySettings)
    # a sweep keeps the trial's and the judge's vLLM engines on the GPU together: their shares add up to 0.9
    evaluation: EvalSettings = Field(
        default_factory=lambda: EvalSettings(gpu_memory_utilization=0.55, judge_gpu_memory_utilization=0.35))

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, values):
        for v in values:
            if not 0 < v < 1:
                raise ValueError(f"grid λ values lie strictly between 0 and 1 (0 and 1 are the baselines, always evaluated); got {v}")
        return sorted(set(values))

    @model_validator(mode="after")
    def _placement(self):
        judge = self.evaluation.judge
        if self.ray.judge_placement == "shared":
            if self.executor != "ray":
                raise ValueError("--judge-placement shared places the judge on a Ray actor: add --executor ray")
            if not is_model_judge(judge):
                raise ValueError(f"--judge-placement shared is for a judge model (wildguard, llamaguard); "
                                 f"the {judge_name(judge)} judge runs in each worker at no cost")
        return self

    @model_validator(mode="after")
    def _engines_fit(self):
        ev, ray = self.evaluation, self.ray
        if ev.backend == "vllm":
            if ray.judge_placement == "worker" and ev.gpu_memory_utilization + ev.judge_gpu_memory_utilization > 1:
                raise ValueError("vllm: the trial model's and the judge's engines share the GPUs: --gpu-memory-utilization "
                                 f"({ev.gpu_memory_utilization}) + --judge-gpu-memory-utilization "
                                 f"({ev.judge_gpu_memory_utilization}) must be at most 1")
            if self.executor == "ray" and ray.gpus_per_trial < ev.tensor_parallel_size:
                raise ValueError(f"vllm on ray: each worker's engine spans --tensor-parallel-size {ev.tensor_parallel_size} "
                                 f"GPUs; give --gpus-per-trial {ev.tensor_parallel_size} (now {ray.gpus_per_trial:g})")
        return self

    @model_validator(mode="after")
    def _methods(self):
        if self.policy == "constrained" and all(s.strip().lower().startswith("xstest") for s in self.safety):
            raise ValueError("the constrained policy bounds the attack success rate: give a harmful-prompt --safety set "
                             "(advbench, hexphi, file:...) besides xstest, or use --policy paper")
        for name in self.methods or []:
            m = methods.METHODS.get(name)
            if m is None:
                raise ValueError(f"unknown method {name!r}; available: {', '.join(methods.METHODS)}")
            if len(self.finetuned) < m.min_models:
                raise ValueError(f"{name} needs at least {m.min_models} fine-tuned models (seeds), got {len(self.finetuned)}")
        return self

    @property
    def refines(self) -> bool:
        """Refinement runs after a grid under the constrained policy (the paper policy has no boundary to find)."""
        return self.refine and self.search == "grid" and self.policy == "constrained"

    @property
    def sequential(self) -> bool:
        """Merge trials judged look by look: adaptive, and a safety constraint to decide."""
        return self.adaptive and self.policy == "constrained"

    @property
    def method_list(self) -> list[str]:
        if self.methods is not None:
            return list(dict.fromkeys(self.methods))
        return [m for m in DEFAULT_SWEEP_METHODS if len(self.finetuned) >= methods.get(m).min_models]

    def eval_config(self) -> EvalConfig:
        """The evaluation every trial runs (the model field names the aligned model, for the record)."""
        settings = self.evaluation.model_dump()
        settings["cache_dir"] = settings["cache_dir"] or self.out / "cache"
        settings["stop_when_decided"] = self.adaptive
        return EvalConfig(model=self.aligned, out=self.out, safety=self.safety, tasks=self.task_val + self.task_test,
                          **settings)
