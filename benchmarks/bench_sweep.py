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

Then the same sweep exhaustive and adaptive (issue 15), on the demo's tiny aligned model, its two LoRA
fine-tunes and its held-out sets (400 harmful prompts, 200 to choose on, 200 to report; 160 XSTest-style
prompts; 303 task items; compliance-marker judge), with the demo's four methods at λ 0.2 to 0.8 and the
refinement: the generated tokens of every stored response of each run (both from a cold cache), their wall
times, and whether both chose the same merge. That part runs under the demo's pinned numerics (it starts
itself again with them), so the token counts and the choice are the same on every x86-64 machine.

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
                       refine=False,  # the grid only, so the naive path evaluates the same trials
                       adaptive=False)  # and every trial in full


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


def generated_tokens(run: Path) -> int:
    """Completion tokens of every response the run stored (safety and task, every trial)."""
    return sum(json.loads(line)["completion_tokens"] for f in sorted((run / "trials").glob("*/responses/*.jsonl"))
               for line in f.read_text(encoding="utf-8").splitlines() if line)


def chosen_label(results: dict) -> str:
    chosen = results["choice"]["chosen"]
    if chosen is None or chosen.get("trial") is None:
        return "none"
    return next(t["label"] for t in results["trials"] if t["key"] == chosen["trial"])


def adaptive_against_exhaustive(root: Path) -> dict:
    """The demo's sweep run exhaustive, then adaptive, each from a cold cache."""
    from safemerge.demo.corpus import write_sets
    from safemerge.demo.run import LAMBDAS, METHODS, demo_finetunes, demo_sweep_config
    from safemerge.demo.tiny import cached_tiny_aligned
    from safemerge.sweeps.run import sweep

    aligned = cached_tiny_aligned(progress=False)
    data = write_sets(root / "demo-data")
    adapters = demo_finetunes(aligned, data, root / "demo-finetune", 2, None, False, lambda line: None)
    out = {}
    for mode in ("exhaustive", "adaptive"):
        cfg = demo_sweep_config(aligned, adapters, data, root / f"demo-{mode}", METHODS, LAMBDAS,
                                {"adaptive": mode == "adaptive"})
        started = time.perf_counter()
        result = sweep(cfg, progress=False)
        out[mode] = {"seconds": time.perf_counter() - started, "tokens": generated_tokens(cfg.out),
                     "trials": len(result.results["trials"]), "pruned": len(result.results.get("pruned", [])),
                     "chosen": chosen_label(result.results)}
    return out


def adaptive_rows(compared: dict) -> tuple[list[tuple], str]:
    e, a = compared["exhaustive"], compared["adaptive"]
    rows = [(mode, c["trials"], c["pruned"], c["tokens"], c["seconds"], c["chosen"]) for mode, c in compared.items()]
    last = (f"adaptive/exhaustive generated tokens: {a['tokens'] / e['tokens']:.3f} "
            f"(wall: {a['seconds'] / e['seconds']:.3f}; same choice: {'yes' if a['chosen'] == e['chosen'] else 'no'})")
    return rows, last


def pinned_again() -> None:
    """Start this script again under the demo's pinned numerics, unless it already runs under them."""
    import subprocess

    from safemerge.demo.numerics import can_pin, is_pinned, pinned_environment

    if can_pin() and not is_pinned():
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=pinned_environment(), check=False).returncode)


def main() -> None:
    from safemerge.sweeps.run import sweep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="write the table into README.md's bench-sweep block")
    readme = parser.parse_args().readme
    pinned_again()

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
        compared = adaptive_against_exhaustive(root)
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
    a_rows, last = adaptive_rows(compared)
    a_header = ("demo sweep", "trials", "pruned", "generated tokens", "seconds", "chosen")
    print(f"{a_header[0]:12} {a_header[1]:>6} {a_header[2]:>6} {a_header[3]:>16} {a_header[4]:>8}  {a_header[5]}")
    for mode, trials, pruned, tokens, seconds, chosen in a_rows:
        print(f"{mode:12} {trials:6d} {pruned:6d} {tokens:16,d} {seconds:8.2f}  {chosen}")
    print(last)
    if readme:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
        from readme_blocks import replace_block

        table = "\n".join(["| | seconds |", "|---|---:|"] + [f"| {name} | {seconds:.2f} |" for name, seconds in rows])
        adaptive = "\n".join(["| " + " | ".join(a_header) + " |", "|---|---:|---:|---:|---:|---|"]
                             + [f"| {m} | {t} | {p} | {k:,} | {s:.2f} | {c} |" for m, t, p, k, s, c in a_rows])
        replace_block("bench-sweep", f"{table}\n\n{overhead}\n\n{adaptive}\n\n{last}")

if __name__ == "__main__":
    main()
