"""Merge benchmark: wall time and peak memory of every safemerge method against the I/O floor.

What it measures, on synthetic Llama-shaped bfloat16 models (hidden 2048, vocab 32000,
intermediate 4096, 16 heads / 8 KV heads, untied lm_head; ~1.5 GB at 16 layers):

* the I/O floor, on the very files the merges read: reading every input model's weight
  files in full (sequential reads, 16 MiB buffer) plus writing and fsyncing one file the
  size of the output model;
* each merge method on the 16-layer pair (model_stock on aligned + two fine-tuned seeds),
  linear on a 32-layer pair (peak memory should not grow with depth) and linear with a LoRA
  adapter (r=16 on all 7 linear modules of every layer). Every merge runs as its own
  `safemerge merge ... --quiet` subprocess; its wall time and peak RSS (ru_maxrss from
  os.wait4) are recorded, and its output is deleted afterwards.

Page cache: all inputs are read once before anything is timed, and each case's inputs are
read again just before it (dirty pages are synced too), so the floor and the merges both
read from a warm cache. The figures are printed, never asserted.

Run it (models are built once into benchmarks/_work/ and reused; ~10 GB of disk):

    python benchmarks/bench_merge.py
    python benchmarks/bench_merge.py --methods linear,ties --skip-32 --skip-lora --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# No torch (nor safemerge) at module level: this process must stay small. A child's
# ru_maxrss is at least its parent's peak RSS at spawn time (Linux records the old address
# space's high-water mark at exec), so building models here would inflate every merge's
# figure. Models are built, and versions looked up, in a spawned worker process.

HERE = Path(__file__).resolve().parent
HIDDEN, VOCAB, INTERMEDIATE, HEADS, KV_HEADS = 2048, 32000, 4096, 16, 8
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 500_000_000
NOISE = 0.002  # fine-tuned = aligned + NOISE * randn
LORA_R, LORA_ALPHA = 16, 32
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUFFER = 16 << 20  # sequential I/O buffer of the floor measurement
LAMBDA, DENSITY = 0.5, 0.5
SPEC_VERSION = 1  # bump when the way models are generated changes


# --- building the synthetic models (run in the worker process) ------------------------------


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint, in the order HF saves them."""
    kv = KV_HEADS * HEAD_DIM
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def randn(shape: tuple[int, ...], tag: str, name: str):
    """Standard normal values fixed by (tag, tensor name): any tensor can be regenerated alone."""
    import torch

    digest = hashlib.sha256(f"{tag}:{name}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))


def model_tensor(name: str, shape: tuple[int, ...], seed: int | None):
    """bf16 tensor of the aligned model (seed None: N(0, 0.02) weights, norms 1 + N(0, 0.02))
    or of fine-tune ``seed`` (the aligned values + NOISE·N(0, 1))."""
    import torch

    x = randn(shape, "aligned", name).mul_(0.02)
    if len(shape) == 1:
        x.add_(1.0)
    if seed is not None:
        x = x.to(torch.bfloat16).float().add_(randn(shape, f"seed{seed}", name), alpha=NOISE)
    return x.to(torch.bfloat16)


def shard_groups(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int = 2) -> list[list[tuple]]:
    """Greedy groups of consecutive tensors of about SHARD_BYTES each."""
    groups, size = [[]], 0
    for name, shape in tensors:
        nbytes = itemsize * math.prod(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def model_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_model(tmp: Path, layers: int, seed: int | None) -> None:
    """Write one model, one ~500 MB shard at a time; seed None is the aligned model."""
    from safetensors.torch import save_file

    groups = shard_groups(llama_tensors(layers))
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: model_tensor(name, shape, seed) for name, shape in group}
        save_file(shard, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(tmp / "config.json", model_config(layers))
    write_json(tmp / "tokenizer_config.json", {"model_max_length": 4096, "bos_token": "<s>", "eos_token": "</s>"})


def build_lora(tmp: Path, layers: int) -> None:
    """A PEFT LoRA adapter on every linear module of every layer, random small A and B."""
    import torch
    from safetensors.torch import save_file

    shapes = dict(llama_tensors(layers))
    tensors = {}
    for i in range(layers):
        for module in LINEAR_MODULES:
            block = "self_attn" if module in LINEAR_MODULES[:4] else "mlp"
            target = f"model.layers.{i}.{block}.{module}"
            out_dim, in_dim = shapes[target + ".weight"]
            key = f"base_model.model.{target}"
            tensors[key + ".lora_A.weight"] = randn((LORA_R, in_dim), "lora_A", target).mul_(0.01).to(torch.bfloat16)
            tensors[key + ".lora_B.weight"] = randn((out_dim, LORA_R), "lora_B", target).mul_(0.01).to(torch.bfloat16)
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(tmp / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "aligned",
        "r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(LINEAR_MODULES), "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True,
    })


def environment() -> dict:
    """Versions and the merge methods with what each takes (looked up in the worker)."""
    from importlib.metadata import version

    import torch

    import safemerge

    methods = {m.name: {"takes": sorted(m.parameters), "min_models": m.min_models} for m in safemerge.METHODS.values()}
    return {"torch": str(torch.__version__), "safemerge": version("safemerge"), "methods": methods}


def ensure(pool: ProcessPoolExecutor, path: Path, spec: dict, build, *args, rebuild: bool) -> Path:
    """Build into path (in the worker) unless it holds a complete build of the same spec."""
    stamp = path / "bench_spec.json"
    if not rebuild and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return path
    print(f"building {path.name} {spec} ...", flush=True)
    started = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pool.submit(build, tmp, *args).result()
    write_json(tmp / "bench_spec.json", spec)  # written last: marks a complete build
    tmp.rename(path)
    print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
    return path


# --- the I/O floor ----------------------------------------------------------------------------


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model))


def read_all(model: Path) -> float:
    """Seconds to read every weight file of a model sequentially."""
    buf = memoryview(bytearray(BUFFER))
    started = time.perf_counter()
    for f in weight_files(model):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - started


def write_synced(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes to a new file and fsync it; the file is deleted."""
    chunk = memoryview(os.urandom(BUFFER))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, chunk[: min(left, BUFFER)])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def settle(models: list[Path]) -> None:
    """Comparable cache conditions: inputs in the page cache, no dirty pages waiting."""
    for m in models:
        read_all(m)
    os.sync()


@dataclass
class Floor:
    reads: dict[Path, float]  # best read time of each input
    writes: dict[Path, float]  # best write+fsync time of an output the size of this model

    def of(self, inputs: list[Path], size_of: Path) -> float:
        return sum(self.reads[m] for m in inputs) + self.writes[size_of]


def measure_floor(workdir: Path, inputs: list[Path], outputs: list[Path], repeat: int) -> Floor:
    reads = {m: min(read_all(m) for _ in range(repeat)) for m in inputs}
    writes = {}
    for m in outputs:
        os.sync()
        writes[m] = min(write_synced(workdir / "floor.bin", weight_bytes(m)) for _ in range(repeat))
    return Floor(reads, writes)


# --- timing the merges ----------------------------------------------------------------------


@dataclass
class Case:
    name: str
    method: str
    aligned: Path
    tuned: list[Path]
    size_of: Path  # the model whose size the output has
    params: list[str] = field(default_factory=list)  # --lambda / --density, as the method takes

    @property
    def inputs(self) -> list[Path]:
        return [self.aligned, *self.tuned]


@dataclass
class Result:
    case: Case
    wall: float | None  # None: the merge failed
    rss_mb: float
    floor: float
    error: str = ""


def cli() -> list[str]:
    script = Path(sys.executable).with_name("safemerge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "safemerge"]


def method_params(takes: list[str]) -> list[str]:
    return (["--lambda", str(LAMBDA)] if "lam" in takes else []) + (["--density", str(DENSITY)] if "density" in takes else [])


def merge_command(case: Case, out: Path) -> list[str]:
    inputs = [str(p) for p in case.inputs]
    return [*cli(), "merge", *inputs, "--out", str(out), "--method", case.method, *case.params, "--quiet"]


def run_child(args: list[str], log: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB (ru_maxrss is in KB on Linux) and exit status of a child."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    return wall, usage.ru_maxrss / 1024, child.returncode


def case_floor(case: Case, workdir: Path) -> float:
    """The I/O floor of one case, measured right before its merge: the disk's speed drifts
    (write+fsync of 1.5 GB took 0.8 to 3.8 s here within an hour), so each merge is compared
    with a floor taken under the same conditions."""
    settle(case.inputs)
    reads = sum(read_all(m) for m in case.inputs)
    return reads + write_synced(workdir / "floor.bin", weight_bytes(case.size_of))


def time_case(case: Case, workdir: Path, repeat: int) -> Result:
    out, log = workdir / "out" / case.name.replace(" ", "_"), workdir / "merge.log"
    walls, floors, rss = [], [], 0.0
    for _ in range(repeat):
        floors.append(case_floor(case, workdir))
        shutil.rmtree(out, ignore_errors=True)
        settle(case.inputs)
        wall, peak, code = run_child(merge_command(case, out), log)
        shutil.rmtree(out, ignore_errors=True)
        rss = max(rss, peak)
        if code != 0:
            return Result(case, None, rss, min(floors), log.read_text().strip()[-500:])
        walls.append(wall)
    return Result(case, min(walls), rss, min(floors))


def startup_seconds(workdir: Path) -> float:
    """The fixed cost in every wall time: starting Python and importing torch and safemerge."""
    return min(run_child([*cli(), "methods"], workdir / "merge.log")[0] for _ in range(2))


# --- report ---------------------------------------------------------------------------------


def label(case: Case) -> str:
    return " + ".join(p.name for p in case.inputs)


def table(results: list[Result], startup: float) -> str:
    """wall/floor is the user's view (the floor has no Python start-up to pay); the last
    column leaves out the start-up measured once (python + torch import), the merge's own share."""
    rows = [("case", "inputs", "wall s", "peak RSS MB", "I/O floor s", "wall/floor", "(wall - start-up)/floor")]
    for r in results:
        if r.wall is None:
            rows.append((r.case.name, label(r.case), "FAILED", f"{r.rss_mb:.0f}", f"{r.floor:.2f}", "-", "-"))
        else:
            rows.append((r.case.name, label(r.case), f"{r.wall:.2f}", f"{r.rss_mb:.0f}", f"{r.floor:.2f}",
                         f"{r.wall / r.floor:.2f}x", f"{(r.wall - startup) / r.floor:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdicts(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.wall is None:
            lines.append(f"{r.case.name}: FAILED: {r.error}")
            continue
        ratio = r.wall / r.floor
        ok = ratio <= 2.0
        if r.case.method == "linear":
            ok = ratio <= 1.3 and r.rss_mb < 1024
        if not ok:
            lines.append(f"{r.case.name}: misses its target ({ratio:.2f}x the floor, {r.rss_mb:.0f} MB)")
    return lines or ["all targets met"]


def floor_parts(floor: Floor) -> str:
    reads = ", ".join(f"{p.name} {t:.2f} s" for p, t in floor.reads.items())
    writes = ", ".join(f"{weight_bytes(p) / 1e9:.2f} GB {t:.2f} s" for p, t in floor.writes.items())
    return f"floor parts: read {reads}; write+fsync {writes}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def header(env: dict, startup: float, sizes: dict[str, int]) -> str:
    size_text = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items())
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return "\n".join([
        f"machine: {os.cpu_count()} CPU cores, {ram:.0f} GiB RAM, torch {env['torch']}, python {sys.version.split()[0]}, "
        f"safemerge {env['safemerge']}",
        "targets: linear within 1.3x the I/O floor with peak RSS under 1 GB (1024 MB); every method within 2x the floor",
        f"models (bf16 weights): {size_text}; lambda {LAMBDA}, density {DENSITY} where taken",
        "page cache: warm; inputs read before anything is timed and again before each case, so floor and merges both read from cache",
        "I/O floor = read every input's weight files + write and fsync one file of the output's size, measured right before each merge (best of the runs); the parts below were measured once at the start",
        f"wall includes CLI start-up (python + torch import): {startup:.2f} s",
        f"peak RSS: ru_maxrss of the merge process (os.wait4); this benchmark process peaked at {peak_rss_mb():.0f} MB, "
        "a lower bound of any child's figure",
    ])


# --- main -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=HERE / "_work", help="where models are built and merged (default %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the models even if a matching build exists")
    p.add_argument("--methods", default="", help="comma list of methods for the 16-layer pair (default all)")
    p.add_argument("--skip-32", action="store_true", help="skip linear on the 32-layer pair")
    p.add_argument("--skip-lora", action="store_true", help="skip linear with the LoRA adapter")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the best wall time is reported (default 1)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def chosen_methods(args, env: dict) -> list[str]:
    unknown = [m for m in args.methods if m not in env["methods"]]
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(env['methods'])}")
    return args.methods or list(env["methods"])


def plan_cases(args, env: dict, workdir: Path, pool: ProcessPoolExecutor) -> list[Case]:
    """Build (or reuse) the models the chosen cases need and list the cases."""

    def model(name: str, layers: int, seed: int | None) -> Path:
        spec = {"version": SPEC_VERSION, "kind": "model", "layers": layers, "seed": seed, "noise": NOISE}
        return ensure(pool, workdir / name, spec, build_model, layers, seed, rebuild=args.rebuild)

    aligned, seed0 = model("aligned", 16, None), model("seed0", 16, 0)
    linear = method_params(env["methods"]["linear"]["takes"])
    cases = []
    for m in chosen_methods(args, env):
        info = env["methods"][m]
        tuned = [seed0, model("seed1", 16, 1)] if info["min_models"] > 1 else [seed0]
        cases.append(Case(m, m, aligned, tuned, aligned, method_params(info["takes"])))
    if not args.skip_32:
        aligned32 = model("aligned32", 32, None)
        cases.append(Case("linear 32L", "linear", aligned32, [model("seed0_32", 32, 0)], aligned32, linear))
    if not args.skip_lora:
        spec = {"version": SPEC_VERSION, "kind": "lora", "layers": 16, "r": LORA_R, "alpha": LORA_ALPHA}
        lora = ensure(pool, workdir / "lora", spec, build_lora, 16, rebuild=args.rebuild)
        cases.append(Case("linear LoRA", "linear", aligned, [lora], aligned, linear))
    return cases


def report(env: dict, startup: float, floor: Floor, results: list[Result], inputs: list[Path], repeat: int, load: float) -> None:
    print()
    print(header(env, startup, {p.name: weight_bytes(p) for p in inputs}))
    print(f"load average (1 min) when timing started: {load:.2f}; other processes busy on the "
          f"{os.cpu_count()} cores inflate the times (the merges' own threads need them all)")
    print(floor_parts(floor))
    print(f"runs per case: {repeat}" + (" (best wall time, highest peak RSS)" if repeat > 1 else ""))
    print()
    print(table(results, startup))
    print()
    print("\n".join(verdicts(results)))


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        env = pool.submit(environment).result()
        cases = plan_cases(args, env, workdir, pool)
    inputs = list(dict.fromkeys(p for c in cases for p in c.inputs))
    outputs = list(dict.fromkeys(c.size_of for c in cases))
    print("warming the page cache ...", flush=True)
    settle(inputs)
    load = os.getloadavg()[0]
    floor = measure_floor(workdir, inputs, outputs, args.repeat)
    startup = startup_seconds(workdir)
    results = []
    for case in cases:
        print(f"merging: {case.name} ({label(case)}) ...", flush=True)
        results.append(time_case(case, workdir, args.repeat))
    report(env, startup, floor, results, inputs, args.repeat, load)


if __name__ == "__main__":
    main()
