"""Sweep benchmark: where a sweep's time goes, and what merging in place saves.

On a small random Llama (hidden 512, 4 layers, vocab 8192; 20 M parameters, bfloat16 on disk,
float32 in memory) and two fine-tuned copies, a grid sweep (aligned, 2 fine-tuned, linear and
ties at λ 0.3 and 0.7 per seed, model_stock: 12 trials) over 64 harmful prompts (32 to choose on, 32
to report; keyword judge)
and 16 validation items, 32 new tokens per response, is timed three ways:

* the sweep as users run it (`safemerge.sweep.sweep`), from a cold generation cache: its total
  wall time against the sum of its trials' generation, judging and scoring times (the overhead
  is everything else: loading, in-place merges, fingerprints, trial records, report, the chosen
  model written);
* the naive path: for every trial, write the merge with `safemerge merge`, load it back with
  transformers, and evaluate it (same generation settings, a cold cache of its own).

The figures are printed, never asserted.

    python benchmarks/bench_sweep.py
    python benchmarks/bench_sweep.py --readme   # also write the README's table
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import build  # noqa: E402  (the same small model and tokenizer)


def inputs(root: Path) -> dict:
    model, tokenizer = build(8192)
    paths = {"aligned": root / "aligned"}
    model.to(torch.bfloat16).save_pretrained(paths["aligned"])
    tokenizer.save_pretrained(paths["aligned"])
    gen = torch.Generator().manual_seed(0)
    for s in range(2):
        tuned = root / f"seed{s}"
        with torch.no_grad():
            state = {k: v.float() + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        copy = type(model)(model.config)
        copy.load_state_dict(state)
        copy.to(torch.bfloat16).save_pretrained(tuned)
        tokenizer.save_pretrained(tuned)
        paths[f"seed{s}"] = tuned
    harmful = root / "harmful.csv"
    harmful.write_text("goal\n" + "".join(" ".join(f"w{(i * 37 + j * 11) % 8000}" for j in range(30)) + "\n" for i in range(64)))
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"question": " ".join(f"w{(i * 13 + j) % 8000}" for j in range(40)),
                                       "answer": f"#### {i}"}) + "\n" for i in range(16)))
    keywords = root / "keywords.txt"
    keywords.write_text("w1\n")
    return {**paths, "harmful": harmful, "val": val, "keywords": keywords}


def sweep_config(paths: dict, out: Path):
    from safemerge.config import SweepConfig

    return SweepConfig(aligned=str(paths["aligned"]), finetuned=[str(paths["seed0"]), str(paths["seed1"])], out=out,
                       methods=["linear", "ties", "model_stock"], lambdas=[0.3, 0.7],
                       safety=[f"file:{paths['harmful']}"], judge=f"keyword:{paths['keywords']}",
                       task_val=[f"gsm8k:{paths['val']}"], max_new_tokens=32, batch_size=16, device="cpu",
                       refine=False)  # the grid only, so the naive path evaluates the same trials


def naive(cfg, root: Path) -> tuple[float, int]:
    """Every trial written to disk with `safemerge merge`, loaded back, and evaluated."""
    from safemerge.backends.generation import TransformersBackend
    from safemerge.backends.models import load_model
    from safemerge.evaluation.run import build_judge, generate_and_score, judge_all
    from safemerge.merging.stream import run as run_merge
    from safemerge.sweeps.trials import baselines, grid_trials, sweep_plan

    started = time.perf_counter()
    eval_cfg = cfg.eval_config().model_copy(update={"cache_dir": root / "naive-cache"})
    plan = sweep_plan(cfg, "cpu")
    judge = build_judge(plan.judge_spec, eval_cfg, "cpu")
    trials = baselines(cfg) + grid_trials(cfg)
    quiet = lambda description, total: lambda n: None  # noqa: E731
    for i, trial in enumerate(trials):
        out = root / f"naive-{i}"
        run_merge(trial.merge_config(cfg, out), progress=False)
        loaded = load_model(str(out), device="cpu", dtype="float32")
        backend = TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint, batch_size=cfg.evaluation.batch_size)
        measured = generate_and_score(backend, plan, eval_cfg, quiet)
        judge_all(measured, plan, judge, quiet)
        shutil.rmtree(out)
    return time.perf_counter() - started, len(trials)


def main() -> None:
    from safemerge.sweeps.run import sweep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="write the table into README.md's bench-sweep block")
    readme = parser.parse_args().readme

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = inputs(root)
        cfg = sweep_config(paths, root / "run")
        started = time.perf_counter()
        result = sweep(cfg, progress=False)
        total = time.perf_counter() - started
        trials = result.results["trials"]
        work = {k: sum(t["seconds"][k] for t in trials) for k in ("generate", "judge", "score", "merge")}
        evaluation = work["generate"] + work["judge"] + work["score"]
        naive_total, naive_trials = naive(cfg, root)
    rows = [("sweep, total", total), ("generation (sum over trials)", work["generate"]),
            ("judging + scoring (sum over trials)", work["judge"] + work["score"]),
            ("in-place merges (sum over trials)", work["merge"]),
            ("everything else (loading, fingerprints, records, report, chosen model)", total - evaluation - work["merge"])]
    overhead = (f"Overhead over generation + judging + scoring: {100 * (total / evaluation - 1):.1f}% (target: within "
                f"15%). The naive path ({naive_trials} trials written with `safemerge merge`, loaded back and "
                f"evaluated) took {naive_total:.2f} s, {naive_total / total:.2f}× the sweep.")
    print(f"model: Llama 20 M parameters (bfloat16 on disk, float32 in memory), {torch.get_num_threads()} threads; "
          f"{len(trials)} trials x (64 safety prompts + 16 validation items), 32 new tokens each")
    print(f"{'':72} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:72} {seconds:8.2f}")
    print(overhead)
    if readme:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
        from readme_blocks import replace_block

        table = "\n".join(["| | seconds |", "|---|---:|"] + [f"| {name} | {seconds:.2f} |" for name, seconds in rows])
        replace_block("bench-sweep", f"{table}\n\n{overhead}")

if __name__ == "__main__":
    main()
