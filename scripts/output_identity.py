"""Hash every output file of merge, evaluate, sweep and demo on fixed inputs, to show a refactor
changes no output byte.

    python scripts/output_identity.py --out before.json          # on the old code
    python scripts/output_identity.py --out after.json --compare before.json

The inputs are built from seeds (the test suite's tiny Llama, fine-tuned copies, a real PEFT
adapter, small prompt and task files) under a fixed directory, so absolute paths inside the outputs
are the same in every run. Each command runs as a user runs it (`python -m safemerge ...`, pinned
numerics for the demo). The manifest maps each output file to its SHA-256, and each JSON file also
to the SHA-256 of its content with sorted keys, so a comparison tells a reordering from a change. Wall-clock figures
(JSON fields named in VOLATILE_KEYS, "in 1.2s" / "12 s" in logs and reports, the seconds column of
the report's trials table, ISO timestamps) are
the only thing masked: they differ between two runs of the same code. Everything else must match
byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/safemerge-output-identity")
VOLATILE_KEYS = {"seconds", "elapsed", "started", "finished", "created", "timestamp", "wall", "total_seconds",
                 "train_runtime", "seconds_per_step", "train_samples_per_second", "train_steps_per_second", "runtime"}
TIME_PATTERNS = [re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"),
                 re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?( UTC)?"),
                 re.compile(rb"\b\d+(\.\d+)?\s?(s|ms|seconds|min)\b"),
                 # the report's trials table ends with a "seconds" column, the only cells with one decimal
                 re.compile(rb"\| (\*\*)?\d+\.\d(\*\*)? \|$", re.M),
                 re.compile(rb"<td>(<strong>|<b>)?\d+\.\d(</strong>|</b>)?</td></tr>")]
REDUCED_DEMO = """
import sys
from pathlib import Path
from safemerge.demo.run import run_demo
run_demo(Path(sys.argv[1]), seeds=1, progress=False, methods=["linear"], lambdas=[0.2, 0.8], echo=lambda line: None)
"""


def build_inputs(root: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import build_model, finetune_copy, lora_adapter, save_model, write_sweep_sets

    base = build_model("llama", seed=11)
    paths = {"aligned": save_model(base, root / "aligned", torch.bfloat16)}
    for s in range(2):
        paths[f"seed{s}"] = save_model(finetune_copy(base, s, scale=0.05), root / f"seed{s}", torch.bfloat16)
    paths["lora"] = lora_adapter(base, root / "lora", seed=3)
    return {**paths, **write_sweep_sets(root)}


def commands(p: dict, out: Path) -> list[list[str]]:
    a, s0, s1 = str(p["aligned"]), str(p["seed0"]), str(p["seed1"])
    merges = [("linear", ["--lambda", "0.3"]), ("slerp", ["--lambda", "0.6"]), ("ties", ["--lambda", "0.5"]),
              ("dare_linear", ["--lambda", "0.5"]), ("model_stock", [])]
    runs = [["merge", a, s0, s1, "--out", str(out / f"merge-{m}"), "--method", m, *extra, "--quiet"]
            for m, extra in merges]
    runs.append(["merge", a, str(p["lora"]), "--out", str(out / "merge-lora"), "--lambda", "0.7", "--quiet"])
    runs.append(["merge", a, s0, "--out", str(out / "merge-fp32"), "--dtype", "float32", "--lambda", "0.4", "--quiet"])
    common = ["--judge", f"keyword:{p['keywords']}", "--max-new-tokens", "8", "--batch-size", "4", "--device", "cpu"]
    runs.append(["evaluate", a, "--out", str(out / "evaluate"), "--safety", f"file:{p['harmful']}",
                 "--task", f"gsm8k:{p['test']}", "--cache-dir", str(out / "cache-evaluate"), *common])
    runs.append(["sweep", "--aligned", a, "--finetuned", s0, s1, "--out", str(out / "sweep"), "--methods",
                 "linear,ties,model_stock", "--lambdas", "0.3,0.7", "--safety", f"file:{p['harmful']}",
                 "--task-val", f"gsm8k:{p['val']}", "--task-test", f"gsm8k:{p['test']}",
                 "--cache-dir", str(out / "cache-sweep"), "--quiet", *common])
    return runs


def run_all(work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    p = build_inputs(inputs)
    out = work / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SAFEMERGE_CACHE": str(work / "cache")}
    for args in commands(p, out):
        print("$ safemerge " + " ".join(args[:2]) + " ...", flush=True)
        subprocess.run([sys.executable, "-m", "safemerge", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(ROOT / "src"))
    from safemerge.demo.numerics import pinned_environment

    print("$ reduced demo ...", flush=True)
    subprocess.run([sys.executable, "-c", REDUCED_DEMO, str(out / "demo")], check=True,
                   env={**pinned_environment(), "SAFEMERGE_CACHE": str(work / "cache")}, stdout=subprocess.DEVNULL)
    return out


def masked_json(value):
    if isinstance(value, dict):
        return {k: ("<time>" if k in VOLATILE_KEYS else masked_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked_json(v) for v in value]
    return value


def normalised(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".json":
        return json.dumps(masked_json(json.loads(data)), sort_keys=False).encode()
    if path.suffix == ".jsonl":
        return b"\n".join(json.dumps(masked_json(json.loads(line))).encode() for line in data.splitlines())
    if path.suffix in {".md", ".html", ".log", ".txt"}:
        for pattern in TIME_PATTERNS:
            data = pattern.sub(b"<time>", data)
    return data


def manifest(out: Path) -> dict[str, dict[str, str]]:
    """Each file's hash; a JSON file's also with its keys sorted, to tell a reordering from a change."""
    files, content = {}, {}
    for f in sorted(out.rglob("*")):
        if f.is_file():
            name = str(f.relative_to(out))
            files[name] = hashlib.sha256(normalised(f)).hexdigest()
            if f.suffix == ".json":
                sorted_json = json.dumps(masked_json(json.loads(f.read_bytes())), sort_keys=True).encode()
                content[name] = hashlib.sha256(sorted_json).hexdigest()
    return {"files": files, "json_content": content}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="write the manifest here")
    parser.add_argument("--compare", type=Path, help="a manifest to compare with; exit 1 on any difference")
    args = parser.parse_args()
    found = manifest(run_all(WORK))
    files = found["files"]
    args.out.write_text(json.dumps(found, indent=1) + "\n")
    print(f"{len(files)} output files hashed into {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        changed = sorted(k for k in before["files"].keys() & files.keys() if before["files"][k] != files[k])
        reordered = [k for k in changed if k in found["json_content"]
                     and before["json_content"].get(k) == found["json_content"][k]]
        only = sorted(before["files"].keys() ^ files.keys())
        for name in changed:
            print(f"{'same JSON, keys in another order' if name in reordered else 'differs'}: {name}")
        for name in only:
            print(f"{'only before' if name in before['files'] else 'only after'}: {name}")
        print(f"{len(files) - len(changed)} of {len(files)} identical; {len(reordered)} the same JSON with keys "
              f"reordered; {len(changed) - len(reordered)} differ; {len(only)} not in both")
        sys.exit(1 if changed or only else 0)

if __name__ == "__main__":
    main()
