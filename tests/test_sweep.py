"""`safemerge sweep` end to end on tiny real models: trials, in-place merges equal to written
merges, resume after a kill, bisection, the report and `safemerge run` / `safemerge report`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_model, finetune_copy, save_model

from safemerge.backends.models import load_model
from safemerge.checkpoints.readers import open_source
from safemerge.config import MergeConfig
from safemerge.evaluation.sequential import boundaries, decisions_at_margin, expected_size_at_margin, plan_looks
from safemerge.evaluation.stats import wilson
from safemerge.merging.inplace import merge_into
from safemerge.merging.stream import merge
from safemerge.sweeps.choose import meets_constraint


@pytest.fixture(scope="module")
def inputs(sweep_inputs):
    return sweep_inputs


def sweep_args(inputs, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--aligned", str(inputs["aligned"]), "--finetuned", *map(str, inputs["seeds"]), "--out", str(out),
            "--safety", f"file:{inputs['harmful']}", "--judge", f"keyword:{inputs['keywords']}",
            "--task-val", f"gsm8k:{inputs['root'] / 'val.jsonl'}", "--task-test", f"gsm8k:{inputs['root'] / 'test.jsonl'}",
            "--max-new-tokens", "8", "--quiet", *extra]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEMERGE_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def keyword_harmful(text: str) -> bool:
    return not any(k in text for k in ("w43", "w86"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def grid_run(inputs, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("grid")
    r = run_cli(sweep_args(inputs, cwd / "run", "--methods", "linear,ties,model_stock", "--lambdas", "0.3,0.7",
                           "--policy", "paper"), cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run", r


def test_grid_sweep_writes_every_output(inputs, grid_run):
    run, r = grid_run
    results = json.loads((run / "results.json").read_text())
    labels = sorted(t["label"] for t in results["trials"])
    expected = ["aligned", "fine-tuned (seed 0)", "fine-tuned (seed 1)", "model_stock"] + [
        f"{m} λ={lam} (seed {s})" for m in ("linear", "ties") for lam in (0.3, 0.7) for s in (0, 1)]
    assert labels == sorted(expected)
    for trial in results["trials"]:
        trial_dir = run / "trials" / trial["key"]
        assert json.loads((trial_dir / "trial.json").read_text()) == trial
        for part in ("selection", "report"):
            record = trial["safety"]["file:harmful.csv"][part]
            answers = rows(trial_dir / "responses" / f"file_harmful.csv_{part}.jsonl")
            assert record["asr"] == wilson(sum(keyword_harmful(a["response"]) for a in answers), len(answers)).to_dict()
            assert len(answers) == 8
        assert set(trial["tasks"]["val"]) == {"gsm8k"} and trial["tasks"]["test"]["gsm8k"]["n"] == 4
    selection = rows(run / "trials" / results["trials"][0]["key"] / "responses" / "file_harmful.csv_selection.jsonl")
    report = rows(run / "trials" / results["trials"][0]["key"] / "responses" / "file_harmful.csv_report.jsonl")
    assert not {a["id"] for a in selection} & {a["id"] for a in report}  # the reported ASR is not the one chosen on
    for name in ("report.md", "report.html", "results.json", "sweep.json", "sweep.log"):
        assert (run / name).stat().st_size > 0
    assert list((run / "plots").glob("*.png"))
    chosen = results["choice"]["chosen"]
    assert results["choice"]["policy"] == "paper" and chosen["kind"] == "merge"
    assert (run / "merged" / "model.safetensors").exists() and "report.md" in (run / "merged" / "README.md").read_text()
    assert results["reproduce"].startswith("safemerge merge") and results["merged"] == "merged"
    assert chosen["label"] in (run / "report.md").read_text()
    assert results["choice"]["reason"] in r.stdout


def test_the_chosen_trial_is_exactly_the_written_merge(inputs, grid_run, tmp_path):
    run, _ = grid_run
    results = json.loads((run / "results.json").read_text())
    chosen = next(t for t in results["trials"] if t["key"] == results["choice"]["chosen"]["trial"])
    assert open_source(str(run / "merged")).fingerprint() == chosen["fingerprint"]
    again = tmp_path / "again"
    merge(str(inputs["aligned"]), chosen["finetuned"], again, method=chosen["method"], lam=chosen["lam"],
          density=chosen["density"], progress=False)
    written, rewritten = open_source(str(run / "merged")), open_source(str(again))
    for name in written.infos:
        assert torch.equal(written.read(name), rewritten.read(name)), name


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties", "model_stock"])
def test_in_place_merge_equals_the_written_merge(inputs, tmp_path, method):
    live = load_model(str(inputs["aligned"]), device="cpu")
    lam = None if method == "model_stock" else 0.6
    cfg = MergeConfig(aligned=str(inputs["aligned"]), finetuned=[str(s) for s in inputs["seeds"]], out=tmp_path / "x",
                      method=method, lam=lam)
    fingerprint = merge_into(live.model, cfg)
    merge(str(inputs["aligned"]), [str(s) for s in inputs["seeds"]], tmp_path / "w", method=method, lam=lam, progress=False)
    written = load_model(str(tmp_path / "w"), device="cpu")
    assert fingerprint == written.fingerprint
    theirs = written.model.state_dict()
    for name, tensor in live.model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_report_command_rebuilds_the_same_results(grid_run, tmp_path):
    run, _ = grid_run
    before = json.loads((run / "results.json").read_text())
    r = run_cli(["report", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr
    after = json.loads((run / "results.json").read_text())
    for key in ("trials", "choice", "reproduce", "merged", "config"):
        assert after[key] == before[key], key


def test_resume_after_a_kill_redoes_no_finished_trial(inputs, tmp_path):
    args = sweep_args(inputs, tmp_path / "run", "--methods", "linear", "--lambdas", "0.2,0.4,0.6,0.8", "--keep", "none",
                      "--no-refine")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEMERGE_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "safemerge", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "run" / "sweep.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_text().count("evaluated") >= 3:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = [line.split()[2] for line in log.read_text().splitlines() if " evaluated " in line]
    assert 3 <= len(first) < 11, "the kill should land mid-sweep"
    stamps = {k: (tmp_path / "run" / "trials" / k / "trial.json").stat().st_mtime_ns for k in first}
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()[len(first):]
    reused = [line.split()[2] for line in lines if " reused " in line]
    evaluated = [line.split()[2] for line in lines if " evaluated " in line]
    assert set(first) <= set(reused) and not set(first) & set(evaluated)
    assert len(first) + len(evaluated) == 11  # aligned, 2 fine-tuned, 4 λ × 2 seeds
    assert all((tmp_path / "run" / "trials" / k / "trial.json").stat().st_mtime_ns == stamps[k] for k in first)
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["trials"]) == 11


def test_bisection_on_real_trials(inputs, tmp_path):
    r = run_cli(sweep_args(inputs, tmp_path / "run", "--methods", "linear", "--search", "bisect", "--tolerance", "0.25",
                           "--max-asr-increase", "0.5", "--keep", "none"), tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for seed in (0, 1):
        steps = [e for e in results["search_log"] if e["seed"] == seed]
        assert 1 <= len(steps) <= 3 and steps[0]["lam"] == 1.0  # λ = 1, then halving to a width of 0.25
    assert isinstance(results["monotonicity_breaches"], list)


def test_refinement_closes_the_gap_on_the_safety_boundary(inputs, tmp_path):
    args = sweep_args(inputs, tmp_path / "run", "--methods", "linear", "--lambdas", "0.3,0.7", "--tolerance", "0.1",
                      "--keep", "none")
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    refined = [e for e in results["search_log"] if e["phase"] == "refine"]
    assert refined and {e["seed"] for e in refined} == {0, 1}  # every λ on both seeds
    by_key = {t["key"]: t for t in results["trials"]}
    aligned = next(t for t in results["trials"] if t["kind"] == "aligned")
    passes: dict[float, list[bool]] = {}
    for t in results["trials"]:
        if t["kind"] == "merge":
            passes.setdefault(t["lam"], []).append(meets_constraint(t, aligned, 0.02))
    assert set(passes) == {0.3, 0.7} | {e["lam"] for e in refined} and all(e["trial"] in by_key for e in refined)
    low = max((lam for lam, ok in passes.items() if all(ok)), default=0.0)
    high = min((lam for lam in passes if lam > low), default=1.0)
    assert high - low <= 0.1 + 1e-9, passes  # the boundary is found to within the tolerance
    assert "refine" in (tmp_path / "run" / "report.md").read_text()
    again = run_cli(args, tmp_path)  # refined trials are cached like any other
    assert again.returncode == 0, again.stderr
    log = (tmp_path / "run" / "sweep.log").read_text()
    assert log.count(" evaluated ") == len(results["trials"]) and log.count(" reused ") == len(results["trials"])


@pytest.fixture(scope="module")
def far_inputs(inputs, tmp_path_factory):
    """The same aligned model with fine-tunes moved far enough that large λ change its verdicts."""
    root = tmp_path_factory.mktemp("far")
    base = build_model("llama", seed=11)
    seeds = [save_model(finetune_copy(base, s, scale=0.5), root / f"seed{s}", torch.bfloat16) for s in range(2)]
    keywords = root / "keywords.txt"
    keywords.write_text("w85\n")  # in nearly every answer of the aligned model, rarely in the far fine-tunes'
    return {**inputs, "seeds": seeds, "keywords": keywords}


def test_adaptive_grid_prunes_the_lambdas_above_a_failing_one(far_inputs, tmp_path):
    inputs = far_inputs
    lambdas = [0.3, 0.7, 0.8, 0.9]
    r = run_cli(sweep_args(inputs, tmp_path / "run", "--methods", "linear", "--lambdas", ",".join(map(str, lambdas)),
                           "--no-refine", "--keep", "none"), tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    aligned = next(t for t in results["trials"] if t["kind"] == "aligned")
    merges = [t for t in results["trials"] if t["kind"] == "merge"]
    failing = min(t["lam"] for t in merges if not meets_constraint(t, aligned, 0.02))
    # every λ up to the first failing one ran on both seeds; every larger one is pruned, with the reason
    assert sorted((t["lam"], t["seed"]) for t in merges) == [(x, s) for x in lambdas if x <= failing for s in (0, 1)]
    assert sorted((p["lam"], p["seed"]) for p in results["pruned"]) == [(x, s) for x in lambdas if x > failing
                                                                          for s in (0, 1)]
    assert results["pruned"] and all(f"λ = {failing:g}" in p["reason"] for p in results["pruned"])
    assert "Pruned" in (tmp_path / "run" / "report.md").read_text()
    assert results["config"]["adaptive"] is True
    # a merge that fails the group-sequential test stops there: no report part, no tasks
    for t in merges:
        if t["lam"] == failing:
            assert selection_of(t)["sequential"]["decision"] == "fail", selection_of(t)
            (harmful,) = t["safety"].values()
            assert harmful.get("report") is None and not t["tasks"]["val"] and not t["tasks"]["test"]


def selection_of(trial: dict) -> dict:
    (harmful,) = trial["safety"].values()
    return harmful["selection"]


def test_adaptive_sweep_stops_a_passing_merge_early_and_resumes(inputs, tmp_path):
    """With a wide margin a merge whose verdicts match the aligned model's passes before the last look: its
    selection part stops early (the verdicts it has equal the exhaustive sweep's), its report part and tasks run
    in full, the report states the design, and a second run reuses every trial."""
    args = ["--methods", "linear", "--lambdas", "0.5", "--no-refine", "--keep", "none", "--max-asr-increase", "0.5"]
    r = run_cli(sweep_args(inputs, tmp_path / "run", *args), tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    merges = [t for t in results["trials"] if t["kind"] == "merge"]
    assert len(merges) == 2
    exhaustive = run_cli(sweep_args(inputs, tmp_path / "full", *args, "--exhaustive"), tmp_path)
    assert exhaustive.returncode == 0, exhaustive.stderr
    full = {(t["kind"], t["seed"]): t for t in json.loads((tmp_path / "full" / "results.json").read_text())["trials"]}
    for merge in merges:
        part = selection_of(merge)
        seq = part["sequential"]
        assert seq["decision"] == "pass" and len(seq["steps"]) < len(seq["looks"]), seq
        assert part["judged"] == seq["steps"][-1]["n"] < part["n"] == len(part["verdicts"])
        assert part["verdicts"].count("-") == part["n"] - part["judged"]
        reference = selection_of(full[("merge", merge["seed"])])
        assert "sequential" not in reference or reference["sequential"] is None
        assert all(v == w for v, w in zip(part["verdicts"], reference["verdicts"]) if v != "-")
        (harmful,) = merge["safety"].values()
        assert harmful["report"]["n"] == selection_of(merge)["n"] and "-" not in harmful["report"]["verdicts"]
        assert merge["tasks"]["val"] and merge["tasks"]["test"]
        slug = next(iter(merge["safety"])).replace(":", "_")
        stored = list((tmp_path / "run" / "trials" / merge["key"] / "responses").glob("*selection*.jsonl"))
        assert len(stored) == 1 and len(rows(stored[0])) == part["judged"], (slug, stored)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Adaptive evaluation" in report and merges[0]["safety"] and "alpha spending" in report
    assert "Adaptive evaluation" not in (tmp_path / "full" / "report.md").read_text()
    again = run_cli(sweep_args(inputs, tmp_path / "run", *args), tmp_path)
    assert again.returncode == 0, again.stderr
    log = (tmp_path / "run" / "sweep.log").read_text()
    assert log.count(" reused ") == len(results["trials"]) == log.count(" evaluated ")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["trials"] == results["trials"]


def test_run_yaml_and_bad_inputs(inputs, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"aligned: {inputs['aligned']}\nfinetuned: [{inputs['seeds'][0]}]\nout: {tmp_path / 'run'}\n"
        f"methods: [linear]\nlambdas: [0.5]\nsafety: ['file:{inputs['harmful']}']\njudge: keyword\n"
        f"task_val: ['gsm8k:{inputs['root'] / 'val.jsonl'}']\nmax_new_tokens: 4\nlimit: 4\nkeep: all\nrefine: false\n")
    r = run_cli(["run", str(config), "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["trials"]) == 3
    assert [p.name for p in (tmp_path / "run" / "models").iterdir()] == ["linear-lam0.5-seed0"]
    assert (tmp_path / "run" / "models" / "linear-lam0.5-seed0" / "model.safetensors").exists()
    not_a_run = tmp_path / "model"
    not_a_run.mkdir()
    (not_a_run / "config.json").write_text("{}")
    config.write_text(config.read_text() + "lamda: 0.3\n")
    bad = [
        (["run", str(config)], "lamda"),
        (["sweep", "--aligned", str(inputs["aligned"]), "--finetuned", str(inputs["seeds"][0]), "--out", "x",
          "--safety", f"file:{inputs['harmful']}"], "--task-val"),
        (sweep_args(inputs, tmp_path / "bad", "--methods", "linear,frankenmerge"), "frankenmerge"),
        (sweep_args(inputs, tmp_path / "bad", "--lambdas", "0.5,1.5"), "1.5"),
        (sweep_args(inputs, tmp_path / "bad", "--policy", "greedy"), "--policy"),
        (sweep_args(inputs, not_a_run), "not a sweep's run directory"),
        (["sweep", "--aligned", str(inputs["aligned"]), "--finetuned", str(inputs["seeds"][0]), "--out", "y",
          "--safety", "xstest", "--task-val", "gsm8k"], "harmful-prompt"),
    ]
    for args, message in bad:
        r = run_cli(args, tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and message in lines[0], (args, r.stderr)
    assert not (tmp_path / "bad").exists()


def test_successive_live_merges_equal_fresh_written_ones(inputs, tmp_path):
    """After the first pass only changed tensors are rewritten: adapters with different target
    modules, one after the other, must still give exactly the written merges."""
    from conftest import lora_adapter

    from safemerge.merging.inplace import LiveMerger

    base = build_model("llama", seed=11)
    adapters = [lora_adapter(base, tmp_path / "a0", seed=1, target_modules=["q_proj", "v_proj"]),
                lora_adapter(base, tmp_path / "a1", seed=2, target_modules=["k_proj", "o_proj", "up_proj"])]
    live = load_model(str(inputs["aligned"]), device="cpu")
    merger = LiveMerger(live.model)
    steps = [(adapters[1], "linear", 0.5), (adapters[0], "linear", 0.3), (inputs["seeds"][0], "ties", 0.7),
             (adapters[0], "task_arithmetic", 0.9)]
    for i, (source, method, lam) in enumerate(steps):
        cfg = MergeConfig(aligned=str(inputs["aligned"]), finetuned=[str(source)], out=tmp_path / "x", method=method, lam=lam)
        fingerprint = merger.merge(cfg)
        merge(str(inputs["aligned"]), [str(source)], tmp_path / f"w{i}", method=method, lam=lam, progress=False)
        written = load_model(str(tmp_path / f"w{i}"), device="cpu")
        assert fingerprint == written.fingerprint, (method, lam)
        theirs = written.model.state_dict()
        for name, tensor in live.model.state_dict().items():
            assert torch.equal(tensor, theirs[name]), (i, name)


def test_dry_run_prints_the_plan_and_runs_nothing(inputs, tmp_path):
    r = run_cli(sweep_args(inputs, tmp_path / "run", "--methods", "linear,ties,model_stock", "--lambdas", "0.3,0.7",
                           "--dry-run", "--tokens-per-second", "100"), tmp_path)
    assert r.returncode == 0, r.stderr
    grid = 1 + 2 + 2 * 2 * 2 + 1  # aligned, 2 fine-tuned, (linear, ties) × 2 λ × 2 seeds, model_stock
    refining = 2 * 2 * 3  # (linear, ties) × 2 seeds × 3 halvings of the widest gap (0.3 to 0.7) down to 0.05
    trials = grid + refining
    per_trial = 16 + 4 + 4  # harmful prompts, val and test items
    assert f"trials: {trials} (grid" in r.stdout and "per trial: 16 safety prompts" in r.stdout
    assert f"up to {refining} refining λ" in r.stdout
    assert f"generations: {trials * per_trial}" in r.stdout and "0 model calls" in r.stdout
    assert f"at most {trials * per_trial * 8:,}" in r.stdout  # 8 new tokens each
    # adaptive: each merge judges its 8 selection prompts in 4 looks of 2, E[n] of them on average at the margin,
    # and only when it passes (probability P there) its other 16 generations
    merges, design = trials - 3, boundaries(plan_looks(8, 2))
    expected, passes = expected_size_at_margin(design), sum(decisions_at_margin(design)[0])
    at_margin = round(3 * per_trial + merges * (expected + passes * (per_trial - 8)))
    if_all_pass = round(trials * per_trial - merges * (8 - expected))
    assert f"adaptive, expected: {at_margin:,} generations" in r.stdout, r.stdout
    assert f"; {if_all_pass:,} (" in r.stdout and 0 < passes <= 0.05
    assert not (tmp_path / "run").exists()
    exhaustive = run_cli(sweep_args(inputs, tmp_path / "run", "--methods", "linear", "--dry-run", "--exhaustive"),
                         tmp_path)
    assert exhaustive.returncode == 0 and "adaptive" not in exhaustive.stdout, exhaustive.stdout


def test_report_of_a_hand_edited_sweep_json_is_one_clear_line(tmp_path):
    """`safemerge report RUN` reads RUN/sweep.json through the same validation as the command line."""
    import subprocess
    import sys

    run = tmp_path / "run"
    (run / "trials").mkdir(parents=True)
    (run / "sweep.json").write_text('{"aligned": "a", "finetuned": ["b"], "out": "run", "lambdas": [1.5]}')
    r = subprocess.run([sys.executable, "-m", "safemerge", "report", str(run)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {run / 'sweep.json'}: --lambdas") and len(r.stderr.strip().splitlines()) == 1
    (run / "sweep.json").write_text('{"aligned": "a", ')
    r = subprocess.run([sys.executable, "-m", "safemerge", "report", str(run)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cannot read" in r.stderr


QUIET_SWEEP = """
import sys
from safemerge import sweep
from safemerge.config import SweepConfig
sweep(SweepConfig.model_validate_json(sys.argv[1]), progress=False)
"""


def test_the_api_with_progress_off_prints_nothing(inputs, tmp_path):
    from safemerge.config import SweepConfig

    cfg = SweepConfig(aligned=str(inputs["aligned"]), finetuned=[str(inputs["seeds"][0])], out=tmp_path / "run",
                      methods=["linear"], lambdas=[0.5], refine=False, safety=[f"file:{inputs['harmful']}"],
                      judge=f"keyword:{inputs['keywords']}", task_val=[f"gsm8k:{inputs['root'] / 'val.jsonl'}"],
                      max_new_tokens=4, cache_dir=tmp_path / "cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", QUIET_SWEEP, cfg.model_dump_json()], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("", "")  # transformers' "Loading weights" bars included
    assert (tmp_path / "run" / "results.json").exists()
