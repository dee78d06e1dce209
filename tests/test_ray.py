"""The Ray executor on a real local Ray instance (2 CPUs, 2 workers) and tiny real models: the
same trial records and files as the local executor, resume, and a worker killed mid-trial."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'safemerge[ray]')")

from safemerge.checkpoints.readers import open_source
from safemerge.config import SweepConfig
from safemerge.errors import CheckpointError
from safemerge.sweeps.executors import LocalExecutor
from safemerge.sweeps.ray import RayExecutor
from safemerge.sweeps.store import TrialStore
from safemerge.sweeps.trials import CFG_ALIGNED, baselines, evaluation_identity, grid_trials, sweep_plan, trial_key

EVALUATED = re.compile(r"^evaluated ([0-9a-f]{40}) (.+) in \d+\.\ds$")


@pytest.fixture(scope="module")
def inputs(sweep_inputs):
    return sweep_inputs


def sweep_config(inputs, out: Path) -> SweepConfig:
    root = inputs["root"]
    return SweepConfig(aligned=str(inputs["aligned"]), finetuned=[str(s) for s in inputs["seeds"]], out=out,
                       methods=["linear", "model_stock"], lambdas=[0.3, 0.7], safety=[f"file:{inputs['harmful']}"],
                       judge=f"keyword:{inputs['keywords']}", task_val=[f"gsm8k:{root / 'val.jsonl'}"],
                       task_test=[f"gsm8k:{root / 'test.jsonl'}"], max_new_tokens=8, device="cpu")


def keyed_trials(cfg: SweepConfig) -> list:
    """The trials and keys `safemerge sweep` would run (baselines, then the grid)."""
    plan = sweep_plan(cfg, "cpu")
    fingerprints = {CFG_ALIGNED: open_source(cfg.aligned).fingerprint()}
    fingerprints |= {f: open_source(f).fingerprint() for f in cfg.finetuned}
    identity = evaluation_identity(cfg, plan)
    return [(t, trial_key(t, fingerprints, identity)) for t in baselines(cfg) + grid_trials(cfg)]


@pytest.fixture(scope="module")
def local(inputs, tmp_path_factory):
    """Every trial run by the local executor, in this process (one thread, as each Ray worker)."""
    cfg = sweep_config(inputs, tmp_path_factory.mktemp("local") / "run")
    items = keyed_trials(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = LocalExecutor(cfg, TrialStore(cfg.out / "trials"), lambda line: None).run(items)
    finally:
        torch.set_num_threads(threads)
    return {"items": items, "records": records, "trials": cfg.out / "trials"}


def without_seconds(record: dict, cache_hits: bool = True) -> dict:
    """The record minus its timings; minus its cache hits too where a retried trial may reuse
    the generations its killed worker had finished (as any resumed trial does)."""
    record = {k: v for k, v in record.items() if k != "seconds"}
    if not cache_hits:
        record["safety"] = {name: {part: {k: v for k, v in r.items() if k != "cache_hits"} for part, r in parts.items()}
                            for name, parts in record["safety"].items()}
    return record


def stored_files(trial_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(trial_dir)): p.read_text() for p in sorted(trial_dir.rglob("*.jsonl"))}


def assert_same_as_local(local, records: list[dict], trials: Path, cache_hits: bool = True) -> None:
    keys = [key for _, key in local["items"]]
    assert [r["key"] for r in records] == keys
    assert [without_seconds(r, cache_hits) for r in records] == [without_seconds(r, cache_hits) for r in local["records"]]
    assert sorted(p.name for p in trials.iterdir()) == sorted(keys)  # each trial once, no temporary directory left
    for key in keys:
        stored = json.loads((trials / key / "trial.json").read_text())
        theirs = json.loads((local["trials"] / key / "trial.json").read_text())
        assert without_seconds(stored, cache_hits) == without_seconds(theirs, cache_hits)
        assert stored_files(trials / key) == stored_files(local["trials"] / key)
        assert len(stored_files(trials / key)) == 6  # responses: 2 safety parts, 2 tasks; 2 judgements


def test_ray_gives_the_local_records_and_resumes(inputs, local, tmp_path):
    cfg = sweep_config(inputs, tmp_path / "run")
    store, lines, done = TrialStore(cfg.out / "trials"), [], []
    assert not ray.is_initialized()
    with RayExecutor(cfg, store, lines.append, num_workers=2) as executor:
        records = executor.run(local["items"], done.append)
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        workers = executor.workers()
        assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
        again = executor.run(local["items"], done.append)
        missing = replace(local["items"][1][0], finetuned=(str(tmp_path / "no-such-model"),))
        with pytest.raises(CheckpointError, match="no-such-model") as failed:  # a trial's own error, as the local executor's
            executor.run([(missing, "0" * 40)])
        assert len(str(failed.value).splitlines()) == 1 and not (store.root / ("0" * 40)).exists()
    assert not ray.is_initialized()  # the executor started this instance, so it stopped it
    assert_same_as_local(local, records, store.root)
    assert again == records
    evaluated = [EVALUATED.match(line) for line in lines[:len(records)]]
    assert all(evaluated) and sorted(m[1] for m in evaluated) == sorted(r["key"] for r in records)
    assert {m[1]: m[2] for m in evaluated} == {key: trial.label for trial, key in local["items"]}
    assert lines[len(records):] == [f"reused {key} {trial.label}" for trial, key in local["items"]]
    assert sorted(r["key"] for r in done) == sorted(2 * [r["key"] for r in records])


def test_a_worker_killed_mid_trial_loses_nothing(inputs, local, tmp_path):
    cfg = sweep_config(inputs, tmp_path / "run")
    store, lines = TrialStore(cfg.out / "trials"), []
    killed: dict = {}
    finished = threading.Event()
    with RayExecutor(cfg, store, lines.append, num_workers=2) as executor:
        def kill_a_busy_worker() -> None:
            """Once a trial is stored, SIGKILL a worker caught generating another one."""
            while not killed and not finished.is_set():
                if lines and len(executor.actors) == 2:
                    busy = [w for w in executor.workers() if (w["phase"] or "").endswith("generating")]
                    if busy:
                        os.kill(busy[0]["pid"], signal.SIGKILL)
                        killed.update(busy[0])
                time.sleep(0.01)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        try:
            records = executor.run(local["items"])
        finally:
            finished.set()
            killer.join()
        survivors = {w["pid"] for w in executor.workers()}
    assert killed, "no worker was caught mid-trial"
    assert killed["pid"] not in survivors and len(survivors) == 2  # the killed actor was restarted
    assert_same_as_local(local, records, store.root, cache_hits=False)
    evaluated = [m[1] for m in map(EVALUATED.match, lines) if m]
    assert len(evaluated) == len(set(evaluated)) == len(local["items"])  # the killed trial retried, stored once
    assert killed["trial"] in [trial.label for trial, _ in local["items"]]


def test_sweep_with_the_ray_executor_chooses_as_the_local_one(inputs, local, tmp_path):
    """The whole sweep (`executor="ray"`) on a local Ray instance: same trials, same choice."""
    from safemerge.sweeps.run import sweep

    base = sweep_config(inputs, tmp_path / "local-run")
    local_result = sweep(base, progress=False).results
    ray_result = sweep(base.updated(out=tmp_path / "ray-run", executor="ray", num_workers=2),
                       progress=False).results
    assert [without_seconds(t) for t in ray_result["trials"]] == [without_seconds(t) for t in local_result["trials"]]
    assert ray_result["choice"] == local_result["choice"]
    assert (tmp_path / "ray-run" / "report.html").exists()


def test_a_shared_judge_actor_gives_the_verdicts_of_a_judge_in_every_worker(inputs, tmp_path):
    """--judge-placement shared: one actor holds the judge model (here a tiny random model in
    WildGuard's format, so every verdict is a counted parse error) and the worker asks it."""
    from conftest import build_model, save_model

    judge = save_model(build_model("llama", seed=5), tmp_path / "judge", torch.float32)
    base = sweep_config(inputs, tmp_path / "local").model_dump()
    base.update(methods=["linear"], lambdas=[0.5], judge=f"wildguard:{judge}")
    local_cfg = SweepConfig(**base)
    shared_cfg = SweepConfig(**{**base, "out": tmp_path / "ray", "executor": "ray", "judge_placement": "shared"})
    items = keyed_trials(local_cfg)
    assert [key for _, key in keyed_trials(shared_cfg)] == [key for _, key in items]  # placement is not identity
    local_records = LocalExecutor(local_cfg, TrialStore(local_cfg.out / "trials"), lambda line: None).run(items)
    with RayExecutor(shared_cfg, TrialStore(shared_cfg.out / "trials"), lambda line: None, num_workers=1) as executor:
        records = executor.run(items)
        judge_pid = ray.get(executor.judge_actor.__ray_call__.remote(lambda self: os.getpid()))
        assert judge_pid not in {w["pid"] for w in executor.workers()} | {os.getpid()}
    assert [without_seconds(r) for r in records] == [without_seconds(r) for r in local_records]
    for record in records:
        assert stored_files(shared_cfg.out / "trials" / record["key"]) == stored_files(local_cfg.out / "trials" / record["key"])
        assert record["safety"]["file:harmful.csv"]["report"]["judge"] == "wildguard"
        assert record["safety"]["file:harmful.csv"]["report"]["parse_errors"] == 8


def test_a_shared_judge_needs_a_judge_model_and_ray(inputs, tmp_path):
    from safemerge.config import validate
    from safemerge.errors import ConfigError

    base = sweep_config(inputs, tmp_path / "run").model_dump()
    with pytest.raises(ConfigError, match="add --executor ray"):
        validate(SweepConfig, **{**base, "judge": "wildguard", "judge_placement": "shared"})
    with pytest.raises(ConfigError, match="is for a judge model"):
        validate(SweepConfig, **{**base, "executor": "ray", "judge_placement": "shared"})
