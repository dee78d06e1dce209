"""A sweep's trials on vLLM engines.

For a LoRA fine-tune, the linear and task_arithmetic merges at λ are aligned + λ·(the adapter's
update), so one engine holding the aligned weights serves them all: each λ is a LoRA request whose
adapter is scaled by λ (scaled_lora.py), and the λ values of a sweep are generated in shared
engine calls, before the trials are judged one by one (the responses wait in the generation
cache). The aligned baseline is the same engine without a LoRA, the fine-tuned baseline λ = 1.
Any other merge (slerp, TIES, DARE, Model Stock, full fine-tunes) is written to scratch exactly as
`safemerge merge` writes it and served by an engine of its own, which is shut down before the next
one starts: one engine of the trial model is alive at a time, beside the judge's.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from safemerge.backends.generation import Backend, CachedBackend, GenerationSettings, Request, generate_shared
from safemerge.backends.vllm import LORA_RANK_SLOTS, VllmBackend, lora_rank_slot
from safemerge.checkpoints.lora import LoraAdapter
from safemerge.checkpoints.readers import open_source
from safemerge.checkpoints.scaled_lora import adapter_fingerprint
from safemerge.config import SweepConfig

LORA_METHODS = ("linear", "task_arithmetic")  # the merges that are aligned + λ·(adapter update)


def servable_adapter(spec: str, allow_pickle: bool = False) -> tuple[Path, int] | None:
    """The directory and rank of ``spec`` when it is a LoRA adapter vLLM can serve as a λ-scaled
    request (only low-rank factors of linear layers, in safetensors), else None."""
    from safemerge.checkpoints.scaled_lora import WEIGHTS, adapter_rank

    source = open_source(spec, allow_pickle=allow_pickle)
    if not isinstance(source, LoraAdapter):
        return None
    try:
        plain = (not source.full and not any(m.transposed for m in source.modules.values())
                 and (source.path / WEIGHTS).exists())
        rank = adapter_rank(source.path)
    finally:
        source.files.close()
    return (source.path, rank) if plain and rank <= LORA_RANK_SLOTS[-1] else None


def served_by_lora(trial, adapters) -> bool:
    """Whether the trial is served by the aligned engine (no LoRA, or one λ-scaled LoRA);
    ``adapters``: the fine-tunes that are servable LoRA adapters."""
    if trial.kind == "aligned":
        return True
    return (len(trial.finetuned) == 1 and trial.finetuned[0] in adapters
            and (trial.kind == "finetuned" or trial.method in LORA_METHODS))


def engine_plan(cfg: SweepConfig, trials: list) -> dict:
    """How a vLLM sweep serves these trials (from the adapters' headers, no model is loaded)."""
    adapters = {f for f in cfg.finetuned if servable_adapter(f, cfg.evaluation.allow_pickle) is not None}
    lora = sum(served_by_lora(t, adapters) for t in trials)
    merged = len(trials) - lora
    return {"lora_adapters": len(adapters), "lora_trials": lora, "merged_trials": merged,
            "engine_starts": (1 if lora else 0) + merged}


class VllmTrialModels:
    """Gives each trial a backend that generates as the trial's model (see the module docstring).
    Scratch files live under RUN/scratch/<host>-<pid>/ and are removed on close."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        found = {f: servable_adapter(f, cfg.evaluation.allow_pickle) for f in cfg.finetuned}
        self.adapters = {f: a for f, a in found.items() if a is not None}  # spec -> (directory, rank)
        self.fingerprints = {f: adapter_fingerprint(path) for f, (path, _) in self.adapters.items()}
        self.aligned_fingerprint = open_source(cfg.aligned, allow_pickle=cfg.evaluation.allow_pickle).fingerprint()
        self.scratch = cfg.out / "scratch" / f"{socket.gethostname()}-{os.getpid()}"
        self.engine: VllmBackend | None = None
        self.engine_holds: str | None = None  # "aligned", or the scratch path of a merged model

    def by_lora(self, trial) -> bool:
        return served_by_lora(trial, self.adapters)

    def order(self, trials: list) -> list:
        """The aligned engine's trials first, so that it starts once (a stable sort: otherwise as given)."""
        return sorted(trials, key=lambda t: not self.by_lora(t))

    def backend(self, trial) -> tuple[Backend, str]:
        """The trial's backend and the identity of its weights (the response cache's model id)."""
        if not self.by_lora(trial):
            return self.merged_backend(trial)
        engine = self.aligned_engine()
        if trial.kind == "aligned":
            return engine, self.aligned_fingerprint
        adapter, lam = trial.finetuned[0], trial.lam
        model_id = f"{self.aligned_fingerprint}+{lam:g}*lora:{self.fingerprints[adapter]}"
        return engine.for_lambda(self.adapters[adapter][0], lam, model_id=model_id, scratch=self.scratch / "lora"), model_id

    def prefetch(self, trials: list, jobs: dict[str, tuple[list[Request], GenerationSettings]],
                 cache: Callable[[Backend], CachedBackend]) -> int:
        """Generate every job of the aligned engine's trials in shared engine calls, into the
        generation cache (``cache(backend)``, the one each trial's evaluation reads) where each trial
        then finds its responses; how many trials shared them."""
        shared = [t for t in trials if self.by_lora(t)]
        if len(shared) < 2:
            return 0
        views = [self.backend(t)[0] for t in shared]
        caches = [cache(v) for v in views]
        loras = [getattr(v, "lora", None) for v in views]  # the aligned engine itself: no LoRA
        engine = self.engine

        def grid(todo, settings, members, on_batch):
            engine.generate_grid(todo, settings, [loras[k] for k in members],
                                 on_batch=lambda j, batch: on_batch(members[j], batch))

        for requests, settings in jobs.values():
            generate_shared(caches, requests, settings, grid)
        return len(shared)

    def aligned_engine(self) -> VllmBackend:
        if self.engine_holds != "aligned":
            rank = max((r for _, r in self.adapters.values()), default=None)
            self.start("aligned", self.cfg.aligned, self.aligned_fingerprint, rank)
        return self.engine

    def merged_backend(self, trial) -> tuple[Backend, str]:
        from safemerge.merging.stream import run as run_merge

        self.close_engine()  # its GPU memory first; then the merge is written
        where = self.scratch / "merged"
        run_merge(trial.merge_config(self.cfg, where).model_copy(update={"force": True}), progress=False)
        fingerprint = open_source(str(where)).fingerprint()  # the same content fingerprint `safemerge merge` gives
        self.start(str(where), str(where), fingerprint, None)
        return self.engine, fingerprint

    def start(self, holds: str, model: str, model_id: str, lora_rank: int | None) -> None:
        self.close_engine()
        # max_loras: adapters in one batch, so every λ of every seed (and λ = 1) shares the batches
        options = {"max_lora_rank": lora_rank_slot(lora_rank), "max_loras": len(self.fingerprints) * (len(self.cfg.lambdas) + 1)} \
            if lora_rank is not None else {}
        self.engine = VllmBackend(model, model_id=model_id, tensor_parallel_size=self.cfg.evaluation.tensor_parallel_size,
                                  dtype=self.cfg.evaluation.dtype, seed=self.cfg.evaluation.seed,
                                  gpu_memory_utilization=self.cfg.evaluation.gpu_memory_utilization,
                                  chat_template=self.cfg.evaluation.chat_template, enable_lora=lora_rank is not None, **options)
        self.engine_holds = holds

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.engine_holds = None

    def close(self) -> None:
        self.close_engine()
        shutil.rmtree(self.scratch, ignore_errors=True)
