"""`safemerge sweep --backend vllm`, run on CPU against tests/vllm_standin: a stand-in for the part of
vLLM's offline API safemerge calls, built on transformers + peft (LoRA requests applied unmerged,
as vLLM applies them; a GPU-memory ledger like vLLM's start-up check). It is NOT vLLM: these tests
check safemerge's side (which engine holds which weights, λ-scaled LoRA requests, shared batches,
engines shut down, the same results as the transformers sweep); the engine itself is tested in
tests/test_vllm.py where vLLM and a GPU are present."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, lora_adapter, save_model

STANDIN = Path(__file__).parent / "vllm_standin"


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory, sweep_inputs):
    """A float32 aligned Llama and two real PEFT LoRA fine-tunes (seeds), with the sweep tests' sets."""
    root = tmp_path_factory.mktemp("vllm-sweep-inputs")
    base = build_model("llama", seed=11)
    aligned = save_model(base, root / "aligned", torch.float32)
    seeds = [lora_adapter(base, root / f"lora{s}", seed=s, r=4, lora_alpha=16) for s in range(2)]
    for adapter in seeds:  # a real adapter names its base
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(aligned)}))
    return {**sweep_inputs, "aligned": aligned, "seeds": seeds}


def sweep(inputs, cwd: Path, backend: str, *extra: str, judge: str | None = None, methods: str = "linear,slerp",
          lambdas: str = "0.3,0.7") -> tuple[subprocess.CompletedProcess, list[dict]]:
    log = cwd / f"engines-{backend}-{len(list(cwd.glob('engines-*')))}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEMERGE_CACHE": str(cwd / "cache"),
           "PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]), "VLLM_STANDIN_LOG": str(log)}
    args = ["sweep", "--aligned", str(inputs["aligned"]), "--finetuned", *map(str, inputs["seeds"]),
            "--out", str(cwd / f"run-{backend}"), "--backend", backend, "--device", "cpu", "--dtype", "float32",
            "--methods", methods, "--lambdas", lambdas, "--policy", "paper",
            "--safety", f"file:{inputs['harmful']}", "--judge", judge or f"keyword:{inputs['keywords']}",
            "--task-val", f"gsm8k:{inputs['root'] / 'val.jsonl'}", "--task-test", f"gsm8k:{inputs['root'] / 'test.jsonl'}",
            "--max-new-tokens", "8", "--quiet", *extra]
    r = subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=600)
    return r, json.loads(log.read_text()) if log.exists() else []


@pytest.fixture(scope="module")
def runs(lora_inputs, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("vllm-sweep")
    vllm, engines = sweep(lora_inputs, cwd, "vllm")
    assert vllm.returncode == 0, vllm.stderr
    local, _ = sweep(lora_inputs, cwd, "transformers")
    assert local.returncode == 0, local.stderr
    return cwd, engines


def results(cwd: Path, backend: str) -> dict:
    return json.loads((cwd / f"run-{backend}" / "results.json").read_text())


def measured(safety: dict) -> dict:
    """A trial's safety record without its cache hits (the vLLM sweep generated ahead, in shared batches)."""
    return {name: {part: {k: v for k, v in record.items() if k != "cache_hits"} for part, record in parts.items()}
            for name, parts in safety.items()}


def test_one_engine_serves_every_lambda_of_the_lora_fine_tunes_in_shared_batches(runs):
    cwd, engines = runs
    aligned, *merged = engines
    assert aligned["enable_lora"] and Path(aligned["model"]).name == "aligned"
    # aligned, both seeds at λ 1, and linear at λ 0.3 and 0.7 for both seeds: one engine, shared calls
    loras = {lora for call in aligned["calls"] for lora in call["loras"]}
    assert len(loras) == 1 + 2 * 3 and 0 in loras
    assert max(len(call["loras"]) for call in aligned["calls"]) == 7
    # slerp is not aligned + λ·update: each of its 4 trials is a merge written to scratch, an engine each
    assert len(merged) == 4 and not any(e["enable_lora"] for e in merged)
    assert all(e["closed"] for e in engines)  # shut down, one after the other (the ledger refuses two at 0.55)
    assert not list((cwd / "run-vllm" / "scratch").glob("*/*")), "scratch files are removed"


def test_vllm_sweep_measures_what_the_transformers_sweep_measures(runs):
    cwd, _ = runs
    ours = {t["label"]: t for t in results(cwd, "vllm")["trials"]}
    theirs = {t["label"]: t for t in results(cwd, "transformers")["trials"]}
    assert ours.keys() == theirs.keys() and len(ours) == 3 + 8
    for label, trial in ours.items():
        assert trial["key"] != theirs[label]["key"]  # the backend is part of a trial's identity
        assert measured(trial["safety"]) == measured(theirs[label]["safety"]), label
        assert trial["tasks"] == theirs[label]["tasks"], label
        lora = label == "aligned" or not label.startswith("slerp")
        assert trial["generated_by"].startswith("vllm") and trial["generated_by"].endswith("/lora") == (
            lora and label != "aligned")
        if not lora:  # a merge written to scratch: the same content fingerprint as the in-place one
            assert trial["fingerprint"] == theirs[label]["fingerprint"]
    for trial in results(cwd, "vllm")["trials"]:
        other = theirs[trial["label"]]
        for path in (cwd / "run-vllm" / "trials" / trial["key"] / "responses").iterdir():
            mine = [json.loads(line) for line in path.read_text().splitlines()]
            same = [json.loads(line) for line in (cwd / "run-transformers" / "trials" / other["key"] / "responses" /
                                                 path.name).read_text().splitlines()]
            assert [r["response"] for r in mine] == [r["response"] for r in same], (trial["label"], path.name)
    assert results(cwd, "vllm")["choice"]["chosen"]["label"] == results(cwd, "transformers")["choice"]["chosen"]["label"]


def test_a_finished_vllm_sweep_starts_no_engine_again(runs, lora_inputs):
    cwd, _ = runs
    r, engines = sweep(lora_inputs, cwd, "vllm")
    assert r.returncode == 0, r.stderr
    assert engines == []
    assert (cwd / "run-vllm" / "sweep.log").read_text().count("reused") >= 11


def test_dry_run_tells_how_the_engines_will_serve_the_trials(runs, lora_inputs):
    cwd, engines = runs
    r = subprocess.run([sys.executable, "-m", "safemerge", "sweep", "--aligned", str(lora_inputs["aligned"]),
                        "--finetuned", *map(str, lora_inputs["seeds"]), "--out", str(cwd / "dry"), "--backend", "vllm",
                        "--methods", "linear,slerp", "--lambdas", "0.3,0.7", "--safety", f"file:{lora_inputs['harmful']}",
                        "--task-val", f"gsm8k:{lora_inputs['root'] / 'val.jsonl'}", "--dry-run", "--no-refine"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("vllm:"))
    lora_trials = 1 + 2 + 2 * 2  # aligned, λ = 1 per seed, linear λ 0.3 / 0.7 per seed
    assert line.startswith(f"vllm: {lora_trials} trials served by one engine on the aligned model (2 LoRA fine-tune(s)")
    assert f"4 merges written to scratch with an engine each; {len(engines)} engine starts" in line
    assert not (cwd / "dry").exists()


@pytest.mark.parametrize("extra, message", [
    (["--gpu-memory-utilization", "0.7", "--judge-gpu-memory-utilization", "0.4"], "must be at most 1"),
    (["--executor", "ray", "--tensor-parallel-size", "2", "--gpus-per-trial", "1"], "give --gpus-per-trial 2"),
])
def test_engine_settings_that_cannot_fit_are_one_line(lora_inputs, tmp_path, extra, message):
    r, _ = sweep(lora_inputs, tmp_path, "vllm", *extra)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run-vllm").exists()


def test_without_vllm_the_sweep_says_how_to_get_it_before_reading_any_model(lora_inputs, tmp_path):
    from safemerge.backends.vllm import MISSING_VLLM

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    r = subprocess.run([sys.executable, "-m", "safemerge", "sweep", "--aligned", str(lora_inputs["aligned"]),
                        "--finetuned", str(lora_inputs["seeds"][0]), "--out", str(tmp_path / "run"), "--backend", "vllm",
                        "--safety", f"file:{lora_inputs['harmful']}", "--task-val", f"gsm8k:{lora_inputs['root'] / 'val.jsonl'}"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.strip() == f"error: {MISSING_VLLM}"


RAY_SWEEP = """
import json, sys
import ray
from safemerge.config import SweepConfig
from safemerge.sweeps.run import sweep

# a local instance that declares one GPU per worker (logical: the stand-in runs on the CPU); the
# workers inherit this process's environment, the stand-in on PYTHONPATH included
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
cfg = SweepConfig(**json.loads(sys.argv[1]))
sweep(cfg, progress=False)
ray.shutdown()
"""


def test_ray_workers_serve_vllm_trials_as_the_local_executor_does(runs, lora_inputs, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'safemerge[ray]')")
    cwd, _ = runs
    local = json.loads((cwd / "run-vllm" / "sweep.json").read_text())
    # the local sweep's λ 0.3 only: a trial's identity does not depend on the grid around it, so they pair by key
    cfg = {**local, "lambdas": [0.3], "out": str(tmp_path / "run"), "executor": "ray", "gpus_per_trial": 1,
           "cpus_per_trial": 1, "num_workers": 2, "cache_dir": None}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEMERGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", RAY_SWEEP, json.dumps(cfg)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = {t["label"]: t for t in results(cwd, "vllm")["trials"]}
    ours = json.loads((tmp_path / "run" / "results.json").read_text())["trials"]
    assert len(ours) == 7 and len(theirs) == 11  # aligned, 2 fine-tuned, (linear, slerp) at λ 0.3 × 2 seeds
    for trial in ours:
        other = theirs[trial["label"]]
        assert trial["key"] == other["key"]  # where a trial runs is not part of its identity
        assert trial["generated_by"] == other["generated_by"] and trial["fingerprint"] == other["fingerprint"]
        assert measured(trial["safety"]) == measured(other["safety"]) and trial["tasks"] == other["tasks"]
    log = (tmp_path / "run" / "sweep.log").read_text().splitlines()
    order = [line.split(" ", 3)[3].rsplit(" in ", 1)[0] for line in log if " evaluated " in line]
    assert not any(label.startswith("slerp") for label in order[:2])  # the LoRA-served trials are handed out first


def test_the_papers_setup_file_is_a_valid_vllm_sweep():
    import yaml

    from safemerge.config import SweepConfig

    path = Path(__file__).parents[1] / "examples" / "paper-llama3-8b.yaml"
    cfg = SweepConfig(**yaml.safe_load(path.read_text()))
    assert cfg.evaluation.backend == "vllm" and cfg.evaluation.judge == "wildguard" and len(cfg.finetuned) == 3
    assert cfg.method_list == ["linear", "slerp", "dare_linear", "model_stock"] and cfg.lambdas == [0.2, 0.4, 0.6, 0.8]
    assert cfg.evaluation.gpu_memory_utilization + cfg.evaluation.judge_gpu_memory_utilization <= 1


def test_a_judge_model_gets_its_own_engine_beside_the_trial_models(lora_inputs, tmp_path):
    """WildGuard's format, judged by a tiny random model standing in for WildGuard (every verdict is
    a parse error, counted): its engine shares the GPU with the trial engine (0.55 + 0.35)."""
    judge = save_model(build_model("llama", seed=5), tmp_path / "judge", torch.float32)
    inputs = {**lora_inputs, "seeds": lora_inputs["seeds"][:1]}
    r, engines = sweep(inputs, tmp_path, "vllm", judge=f"wildguard:{judge}", methods="linear", lambdas="0.5")
    assert r.returncode == 0, r.stderr
    trial_engines = [e for e in engines if Path(e["model"]).name == "aligned"]
    judge_engines = [e for e in engines if Path(e["model"]).name == "judge"]
    assert len(trial_engines) == 1 and len(judge_engines) == 1 and len(engines) == 2
    assert judge_engines[0]["gpu_memory_utilization"] == 0.35 and not judge_engines[0]["enable_lora"]
    assert sum(call["prompts"] for call in judge_engines[0]["calls"]) == 3 * 16  # 3 trials × 16 harmful prompts
    assert all(e["closed"] for e in engines)
    trials = json.loads((tmp_path / "run-vllm" / "results.json").read_text())["trials"]
    assert all(t["safety"]["file:harmful.csv"]["report"]["parse_errors"] == 8 for t in trials)
