"""Run a sweep's trials on Ray: a pool of actors, each holding one TrialRunner (the aligned model,
the evaluation plan and the judge, loaded once per actor), fed one trial at a time. With
``--judge-placement shared`` the judge model lives instead on one more actor, with its own GPUs
(``--judge-gpus``), and every worker sends it its verdict requests.

The driver stays the only writer: results stream back as they finish (``ray.wait``) and are
stored there, so the cache, the log and the resume behaviour are the local executor's. What
crosses a process boundary is plain data: the config as JSON, a trial as a dict, and back a
record and the rows of its response and judgement files. An actor whose process dies is
restarted (its runner rebuilt) and the trial it was running is retried; since only finished
results are stored, and atomically, a kill can neither lose a trial nor store one twice or half.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING

from safemerge.config import SweepConfig
from safemerge.errors import ConfigError
from safemerge.evaluation.judges import is_model_judge
from safemerge.evaluation.run import Measured
from safemerge.sweeps.store import TrialStore
from safemerge.sweeps.trials import Trial, trial_of

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

# forwarded to the workers when set here (never credentials): where caches live, offline mode
FORWARDED_ENV = ("SAFEMERGE_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'safemerge[ray]' (or pip install 'ray>=2.9')") from None
    return ray


class TrialWorker:
    """The body of one Ray actor. Its `state` runs in a separate concurrency group, so it
    answers while a trial runs (for monitoring, and for tests that kill a busy worker)."""

    def __init__(self, cfg_json: dict, env: dict[str, str], threads: int, judge_actor=None):
        import torch

        from safemerge.sweeps.runner import TrialRunner

        os.environ.update(env)
        torch.set_num_threads(threads)  # no more threads than the CPUs Ray reserved for this actor
        self.trial: str | None = None
        self.phase: str | None = None
        judge = SharedJudge(judge_actor) if judge_actor is not None else None
        self.runner = TrialRunner(SweepConfig(**cfg_json), status=self.note, judge=judge)

    def note(self, text: str) -> None:
        self.phase = text

    def run(self, trial_dict: dict, reference: dict[str, str] | None = None) -> tuple[dict, dict[str, list[dict]]]:
        from safemerge.evaluation.run import jsonable

        trial = trial_of(trial_dict)
        self.trial, self.phase = trial.label, "starting"
        try:
            record, measured = self.runner.run(trial, reference)
            return record, jsonable(measured.records)
        finally:
            self.trial, self.phase = None, None

    def state(self) -> dict:
        return {"pid": os.getpid(), "node": os.uname().nodename, "trial": self.trial, "phase": self.phase}

    def shutdown(self) -> None:
        """Free the models now (vLLM engines are shut down, scratch files removed), before the kill."""
        self.runner.close()


class JudgeWorker:
    """The body of the one Ray actor that holds the judge model when workers share it
    (--judge-placement shared): the judge is loaded once, on its own resources."""

    def __init__(self, cfg_json: dict, env: dict[str, str], threads: int):
        import torch

        from safemerge.backends.models import pick_device
        from safemerge.evaluation.run import build_judge

        os.environ.update(env)
        torch.set_num_threads(threads)
        cfg = SweepConfig(**cfg_json)  # its judge is resolved (never "auto") by the driver
        self.judge = build_judge(cfg.evaluation.judge, cfg.eval_config(), pick_device(cfg.evaluation.device))

    def describe(self) -> dict:
        j = self.judge
        return {"name": j.name, "model": j.model, "settings": j.settings,
                "labels_refusals": getattr(j, "labels_refusals", False)}

    def judge_pairs(self, prompts: list[str], responses: list[str]) -> list:
        return self.judge.judge(prompts, responses)

    def shutdown(self) -> None:
        from safemerge.evaluation.run import release

        backend = getattr(self.judge, "backend", None)
        if backend is not None:
            release(getattr(backend, "backend", backend))  # inside its cache


class SharedJudge:
    """A worker's handle on the shared judge actor, with the Judge interface: each call is a Ray
    round trip (the actor judges one batch at a time, for every worker in turn)."""

    def __init__(self, actor):
        import ray

        self.actor = actor
        info = ray.get(actor.describe.remote())
        self.name, self.model, self.settings = info["name"], info["model"], info["settings"]
        self.labels_refusals = info["labels_refusals"]

    def judge(self, prompts, responses) -> list:
        import ray

        return ray.get(self.actor.judge_pairs.remote(list(prompts), list(responses)))


class RayExecutor:
    """Runs trials on Ray actors with declared resources; same contract as LocalExecutor:
    records in order, stored ones reused, new ones stored (in this process) as they finish.

    Ray is started (or joined, with ``address``) at the first trial that is not stored yet, so
    a sweep that is already complete starts nothing. Use as a context manager, or call close().
    """

    def __init__(self, cfg: SweepConfig, store: TrialStore, log: Callable[[str], None],
                 status: Callable[[str], None] = lambda text: None, *, address: str | None = None,
                 num_workers: int | None = None, gpus_per_trial: float = 0, cpus_per_trial: float = 1,
                 retries: int = 3):
        if gpus_per_trial < 0 or cpus_per_trial <= 0:
            raise ConfigError("--gpus-per-trial must be ≥ 0 and the CPUs per trial > 0")
        if num_workers is not None and num_workers < 1:
            raise ConfigError(f"num_workers must be at least 1; got {num_workers}")
        self.cfg, self.store, self.log, self.status = cfg, store, log, status
        self.address, self.num_workers = address, num_workers
        self.gpus_per_trial, self.cpus_per_trial, self.retries = gpus_per_trial, cpus_per_trial, retries
        self.actors: list = []
        self.judge_actor = None  # --judge-placement shared
        self.owns_ray = False
        self.reference: dict[str, str] | None = None  # the aligned model's selection verdicts: adaptive merges

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers; shut Ray down if this executor started it (a cluster joined with
        ``address`` is only disconnected from: it keeps running)."""
        if not self.actors and not self.owns_ray:
            return
        ray = require_ray()
        actors = [*self.actors, *([self.judge_actor] if self.judge_actor else [])]
        try:  # let each free its models (GPU engines) first; a worker that does not answer is killed anyway
            ray.get([a.shutdown.remote() for a in actors], timeout=120)
        except Exception:  # noqa: BLE001 - a dead or stuck actor must not stop the clean-up of the others
            pass
        for actor in actors:
            ray.kill(actor)
        self.actors, self.judge_actor = [], None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    def connect(self):
        ray = require_ray()
        if ray.is_initialized():
            return ray
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if self.address:
            try:
                ray.init(address=self.address, **quiet)
                self.owns_ray = True  # our connection: close() disconnects, the cluster lives on
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--address {self.address}: cannot join the Ray cluster ({first}); "
                                  "start it with `ray start --head` or leave --address out for a local instance") from None
        else:
            judge = 1 if self.cfg.ray.judge_placement == "shared" else 0  # the shared judge actor: one more
            cpus = None if self.num_workers is None else math.ceil((self.num_workers + judge) * self.cpus_per_trial)
            ray.init(address="local", num_cpus=cpus, **quiet)  # a new instance, never a `ray start` one found here
            self.owns_ray = True
        return ray

    def pool_size(self, ray, pending: int) -> int:
        """As many workers as the cluster holds (or as asked: an autoscaling cluster may grow), never
        more than trials to run; refused when not even one fits (it would wait forever)."""
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        if self.cfg.ray.judge_placement == "shared":  # the judge actor's share is not for workers
            cpus, gpus = cpus - self.cpus_per_trial, gpus - self.cfg.ray.judge_gpus
        fits = int(cpus // self.cpus_per_trial)
        if self.gpus_per_trial:
            fits = min(fits, int(gpus // self.gpus_per_trial))
        if fits < 1:
            judge = f" besides the shared judge ({self.cpus_per_trial:g} CPUs, {self.cfg.ray.judge_gpus:g} GPUs)" \
                if self.cfg.ray.judge_placement == "shared" else ""
            raise ConfigError(f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) "
                              f"cannot hold one trial ({self.cpus_per_trial:g} CPUs, {self.gpus_per_trial:g} GPUs)"
                              f"{judge}; lower --gpus-per-trial or add nodes")
        return min(self.num_workers or fits, pending)

    def grow(self, pending: int) -> None:
        ray = self.connect()
        wanted = self.pool_size(ray, pending)
        if len(self.actors) >= wanted:
            return
        worker = ray.remote(concurrency_groups={"control": 1})(TrialWorker)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        options = {"num_cpus": self.cpus_per_trial, "num_gpus": self.gpus_per_trial,
                   "max_restarts": self.retries, "max_task_retries": self.retries}
        cfg_json = self.cfg.model_dump(mode="json")
        threads = max(1, int(self.cpus_per_trial))
        if self.cfg.ray.judge_placement == "shared" and self.judge_actor is None:
            if not is_model_judge(self.cfg.evaluation.judge):
                raise ConfigError(f"--judge-placement shared is for a judge model; the judge here is {self.cfg.evaluation.judge}")
            judge = ray.remote(JudgeWorker).options(**{**options, "num_gpus": self.cfg.ray.judge_gpus})
            self.judge_actor = judge.remote(cfg_json, env, threads)
        while len(self.actors) < wanted:
            self.actors.append(worker.options(**options).remote(cfg_json, env, threads, self.judge_actor))

    def workers(self, timeout: float = 30) -> list[dict]:
        """Each worker's pid, node and the trial it is running (None when idle)."""
        ray = require_ray()
        return ray.get([a.state.options(concurrency_group="control").remote() for a in self.actors], timeout=timeout)

    # --- running ----------------------------------------------------------------------------

    def run(self, items: Iterable[tuple[Trial, str]], on_done: Callable[[dict], None] = lambda r: None) -> list[dict]:
        items = list(items)
        records: list[dict | None] = [None] * len(items)
        positions: dict[str, list[int]] = {}
        for i, (trial, key) in enumerate(items):
            record = self.store.get(key)
            if record is not None:
                records[i] = record
                self.log(f"reused {key} {trial.label}")
                on_done(record)
            else:
                positions.setdefault(key, []).append(i)
        if positions:
            todo = [(items[at[0]][0], key) for key, at in positions.items()]
            self.evaluate(self.order(todo), positions, items, records, on_done)
        return records  # type: ignore[return-value]

    def order(self, todo: list[tuple[Trial, str]]) -> list[tuple[Trial, str]]:
        """vLLM: the trials an aligned-model engine serves (λ as LoRA requests) first, so that a
        worker does not go back and forth between that engine and engines on written merges."""
        if self.cfg.evaluation.backend != "vllm":
            return todo
        from safemerge.sweeps.vllm import servable_adapter, served_by_lora

        adapters = {f for f in self.cfg.finetuned if servable_adapter(f, self.cfg.evaluation.allow_pickle) is not None}
        return sorted(todo, key=lambda item: not served_by_lora(item[0], adapters))

    def evaluate(self, todo: list[tuple[Trial, str]], positions: dict[str, list[int]], items, records, on_done) -> None:
        """Keep every worker busy with one trial; store each result as it arrives."""
        ray = require_ray()
        self.grow(len(todo))
        queue, idle, running = list(todo), list(self.actors), {}
        failure: BaseException | None = None
        while queue or running:
            while queue and idle and failure is None:
                trial, key = queue.pop(0)
                actor = idle.pop()
                running[actor.run.remote(asdict(trial), self.reference)] = (actor, trial, key, time.perf_counter())
            self.status(f"{len(running)} trials running on Ray, {len(queue)} waiting")
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, trial, key, _ = running.pop(ready[0])
            idle.append(actor)
            try:
                record, rows = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:  # the trial itself failed: finish the others, then raise
                failure = failure or (e.cause if isinstance(e.cause, Exception) else e)
                continue
            except ray.exceptions.RayActorError as e:  # the worker died more often than it may restart
                failure = failure or RuntimeError(f"{trial.label}: its Ray worker died {self.retries + 1} times; "
                                                  f"the sweep can be resumed ({e.__class__.__name__})")
                idle.remove(actor)
                self.actors.remove(actor)
                continue
            self.finish(trial, key, record, rows, positions[key], items, records, on_done)
        if failure is not None:
            raise failure

    def finish(self, trial: Trial, key: str, record: dict, rows: dict[str, list[dict]], at: list[int], items,
               records, on_done) -> None:
        record = {"key": key, **record}
        self.store.put(key, record, Measured(records=rows))
        self.log(f"evaluated {key} {trial.label} in {record['seconds']['total']:.1f}s")
        for n, i in enumerate(at):
            if n:  # the same trial asked for twice: the local executor reuses the first
                self.log(f"reused {key} {items[i][0].label}")
            records[i] = record
            on_done(record)
