"""Bad input, interruptions and full disks, through the real command line.

Every refusal must be one `error:` line on stderr naming the offending file or tensor, a
non-zero exit, no traceback unless --debug (which must show one), and nothing at --out or
beside it (the writer works in `.<name>.tmp-<pid>` and renames it at the end). An output that
existed before a failed `--force` run must be left byte for byte as it was.

Each broken input is a fixture model copied into tmp_path and then broken. Comments marked
"regression" name bugs these tests found and what broke.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model, lora_adapter
from safetensors.torch import load_file, save_file

import safemerge

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
LLAMA = ("llama", torch.float32)
W = "model.layers.1.mlp.down_proj.weight"  # a tensor every fixture model has
LORA_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
ANY_TENSOR = re.compile(r"model\.layers\.\d+\.[\w.]+\.weight")


# --- running the command line ----------------------------------------------------------


def cli(*args) -> subprocess.Popen:
    """`safemerge merge ARGS` in a subprocess, as a user runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "safemerge", "merge", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )


def finish(p: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"safemerge did not finish in {timeout}s; stderr:\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_both(args, out: Path, quiet: bool = True, debug: bool = True):
    """The same invocation without and (concurrently, the CPU has two cores) with --debug."""
    args = [*args, "--out", out, *(["--quiet"] if quiet else [])]
    procs = [cli(*args)] + ([cli(*args, "--debug")] if debug else [])
    plain, *dbg = [finish(p) for p in procs]
    return plain, (dbg[0] if dbg else None)


def leftovers(out: Path) -> list[str]:
    """What a failed run may leave beside --out: `.<name>.tmp-<pid>`, `.<name>.old-<pid>`."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_line(r: subprocess.CompletedProcess) -> str:
    """A failed run's only stderr line (no traceback)."""
    assert r.returncode != 0, f"expected a failure; stdout: {r.stdout!r}; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, "a traceback on stderr, ending: " + " / ".join(r.stderr.strip().splitlines()[-2:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one non-empty line on stderr, got {r.stderr!r}"
    return lines[0]


def check_refused(plain, debug, out: Path, *expected, out_existed: bool = False) -> str:
    line = one_line(plain)
    assert line.startswith("error: ") and line.removeprefix("error: ").strip(), line
    for e in expected:
        if isinstance(e, re.Pattern):
            assert e.search(line), f"{e.pattern!r} not in: {line}"
        else:
            assert str(e) in line, f"{str(e)!r} not in: {line}"
    if not out_existed:
        assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], f"left beside --out: {leftovers(out)}"
    if debug is not None:
        assert debug.returncode != 0 and "Traceback" in debug.stderr, f"--debug shows no traceback:\n{debug.stderr}"
    return line


def assert_refused(args, out: Path, *expected, out_existed=False, quiet=True, debug=True) -> str:
    plain, dbg = run_both(args, out, quiet=quiet, debug=debug)
    return check_refused(plain, dbg, out, *expected, out_existed=out_existed)


# --- breaking inputs ---------------------------------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(d: Path, edit, file: str = "model.safetensors") -> Path:
    state = load_file(d / file)
    edit(state)
    save_file(state, d / file, metadata={"format": "pt"})
    return d


def poison(name: str, value: float = math.nan):
    def edit(state):
        state[name].view(-1)[3] = value
    return edit


def edit_config(d: Path, **changes) -> Path:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


def tensor_names(file: Path) -> list[str]:
    """Tensor names in the order of the file's header (the order safemerge streams them)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


def pickled(d: Path) -> Path:
    """The model directory with its weights as a torch pickle (pytorch_model.bin) instead."""
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ctx(models, tmp_path_factory):
    """The float32 Llama fixture models, and a LoRA adapter of its aligned model."""
    root = tmp_path_factory.mktemp("errors")
    base = build_model("llama")  # the fixture's aligned model (same seed)
    return SimpleNamespace(models=models, m=models[LLAMA], base=base, lora=lora_adapter(base, root / "lora", seed=0))


# --- bad input, one case each --------------------------------------------------------------


@dataclass
class Case:
    args: list  # before --out
    expect: list  # what the error line must contain: strings (or paths) and regexes
    out: Path | None = None  # default: tmp/merged
    quiet: bool = True
    keep: list[Path] = field(default_factory=list)  # directories that must stay byte for byte as they were
    absent: list[Path] = field(default_factory=list)  # paths that must not exist afterwards


CASES = []


def case(*marks):
    def add(fn):
        CASES.append(pytest.param(fn, id=fn.__name__, marks=marks))
        return fn
    return add


@case()
def missing_aligned(tmp, c):
    gone = tmp / "no-such-model"
    return Case([gone, c.m["seed0"]], [gone])


@case()
def missing_finetuned(tmp, c):
    gone = tmp / "seed9"
    return Case([c.m["aligned"], c.m["seed0"], gone], [gone])


@case()
def directory_not_a_model(tmp, c):
    d = tmp / "notes"
    d.mkdir()
    (d / "README.md").write_text("not a model")
    return Case([c.m["aligned"], d], [d])


@case()
def adapter_given_as_aligned(tmp, c):
    return Case([c.lora, c.m["seed0"]], [c.lora])


@case()
def other_architecture(tmp, c):
    qwen = c.models["qwen2", torch.float32]["seed0"]
    return Case([c.m["aligned"], qwen], [qwen, "model_type"])


@case()
def other_hidden_size(tmp, c):
    d = edit_config(copy_dir(c.m["seed0"], tmp / "ft"), hidden_size=64)
    return Case([c.m["aligned"], d], [d, "hidden_size"])


@case()
def tensor_missing(tmp, c):
    d = edit_tensors(copy_dir(c.m["seed0"], tmp / "ft"), lambda s: s.pop(W))
    return Case([c.m["aligned"], d], [d, W])


@case()
def shape_mismatch(tmp, c):
    name = "model.layers.0.self_attn.q_proj.weight"
    d = edit_tensors(copy_dir(c.m["seed0"], tmp / "ft"), lambda s: s.__setitem__(name, torch.zeros(32, 16)))
    return Case([c.m["aligned"], d], [d, name])


# regression: the message named pydantic's field ("lam: Input should be ...") instead of --lambda
@case()
def lambda_above_one(tmp, c):
    return Case([c.m["aligned"], c.m["seed0"], "--lambda", "1.5"], ["--lambda", "1.5"])


@case()
def lambda_below_zero(tmp, c):
    return Case([c.m["aligned"], c.m["seed0"], "--lambda", "-0.1"], ["--lambda", "-0.1"])


@case()
def unknown_method(tmp, c):
    return Case([c.m["aligned"], c.m["seed0"], "--method", "no_such_method"], ["no_such_method", "linear"])


@case()
def model_stock_with_one_finetuned(tmp, c):
    return Case([c.m["aligned"], c.m["seed0"], "--method", "model_stock"], ["model_stock"])


@case()
def model_stock_with_lambda(tmp, c):
    m = c.m
    return Case([m["aligned"], m["seed0"], m["seed1"], "--method", "model_stock", "--lambda", "0.5"], ["model_stock", "--lambda"])


@case()
def adapter_targets_absent_modules(tmp, c):
    d = edit_tensors(copy_dir(c.lora, tmp / "lora"), lambda s: s.update(
        {k.replace("layers.1.", "layers.7."): s.pop(k) for k in list(s) if "layers.1." in k}), "adapter_model.safetensors")
    return Case([c.m["aligned"], d], [d, "model.layers.7."])


@case()
def adapter_of_other_hidden_size(tmp, c):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    d = lora_adapter(wide, tmp / "lora", seed=0)
    return Case([c.m["aligned"], d], [d, ANY_TENSOR, "shape"])


@case()
def dora_adapter(tmp, c):
    d = lora_adapter(c.base, tmp / "dora", seed=0, use_dora=True)
    return Case([c.m["aligned"], d], [d, "DoRA"])


@case()
def ia3_adapter(tmp, c):
    import peft

    d = tmp / "ia3"
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    peft.get_peft_model(copy.deepcopy(c.base), config).save_pretrained(d)
    return Case([c.m["aligned"], d], [d, "IA3"])


@case()
def truncated_safetensors(tmp, c):
    f = copy_dir(c.m["seed0"], tmp / "ft") / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return Case([c.m["aligned"], f.parent], [f])


@case()
def garbage_safetensors(tmp, c):
    f = copy_dir(c.m["seed0"], tmp / "ft") / "model.safetensors"
    f.write_bytes(bytes(range(256)) * 64)
    return Case([c.m["aligned"], f.parent], [f])


# regression: a header that is valid JSON but not an object (here `[]`) crashed read_safetensors_header with a TypeError (fixed)
@case()
def safetensors_header_not_an_object(tmp, c):
    f = copy_dir(c.m["seed0"], tmp / "ft") / "model.safetensors"
    f.write_bytes((8).to_bytes(8, "little") + b"[]      ")
    return Case([c.m["aligned"], f.parent], [f])


@case()
def nan_in_finetuned(tmp, c):
    d = edit_tensors(copy_dir(c.m["seed0"], tmp / "ft"), poison(W))
    return Case([c.m["aligned"], d], [d, W])


@case()
def inf_in_finetuned_bfloat16(tmp, c):
    m = c.models["llama", torch.bfloat16]
    d = edit_tensors(copy_dir(m["seed0"], tmp / "ft"), poison("model.norm.weight", math.inf))
    return Case([m["aligned"], d], [d, "model.norm.weight"])


@case()
def nan_in_aligned(tmp, c):
    d = edit_tensors(copy_dir(c.m["aligned"], tmp / "aligned"), poison(W))
    return Case([d, c.m["seed0"]], [d, W])


@case()
def nan_in_adapter(tmp, c):
    d = edit_tensors(copy_dir(c.lora, tmp / "lora"), poison(LORA_B), "adapter_model.safetensors")
    return Case([c.m["aligned"], d], [d, "model.layers.1.self_attn.v_proj.weight"])


# regression: tensors copied unchanged from ALIGNED (untouched by the adapter, or --keep-aligned)
# were never checked for NaN/Inf, so the merge succeeded and wrote the NaN
@case()
def nan_in_aligned_tensor_the_adapter_leaves_alone(tmp, c):
    d = edit_tensors(copy_dir(c.m["aligned"], tmp / "aligned"), poison("model.norm.weight"))
    return Case([d, c.lora], [d, "model.norm.weight"])


@case()
def nan_in_aligned_tensor_kept_by_keep_aligned(tmp, c):
    d = edit_tensors(copy_dir(c.m["aligned"], tmp / "aligned"), poison(W))
    return Case([d, c.m["seed0"], "--keep-aligned", re.escape(W)], [d, W])


@case()
def pickle_without_allow_pickle(tmp, c):
    d = pickled(copy_dir(c.m["seed0"], tmp / "ft"))
    return Case([c.m["aligned"], d], [d / "pytorch_model.bin", "--allow-pickle"])


@case()
def out_inside_an_input(tmp, c):
    d = copy_dir(c.m["seed0"], tmp / "ft")
    return Case([c.m["aligned"], d], ["--out", d], out=d / "merged")


@case()
def out_is_an_input(tmp, c):
    d = copy_dir(c.m["aligned"], tmp / "aligned")
    return Case([d, c.m["seed0"]], ["--out", d], out=d, keep=[d])


@case()
def out_exists(tmp, c):
    out = copy_dir(c.m["seed1"], tmp / "merged")
    return Case([c.m["aligned"], c.m["seed0"]], [out, "--force"], out=out, keep=[out])


@case()
def force_over_a_good_output_then_nan_in_the_last_tensor(tmp, c):
    """The merge fails after every other shard is written; the old output must survive."""
    out = tmp / "merged"
    safemerge.merge(str(c.m["aligned"]), [str(c.m["seed0"])], out, progress=False)
    last = tensor_names(c.m["aligned"] / "model.safetensors")[-1]
    d = edit_tensors(copy_dir(c.m["seed1"], tmp / "ft"), poison(last))
    return Case([c.m["aligned"], d, "--force", "--shard-size", "20KB"], [d, last], out=out, keep=[out])


# regression: atomic_directory created the missing parents of --out (mkdir parents=True) and left them after a failure
@case()
def failure_under_new_parent_directories(tmp, c):
    d = edit_tensors(copy_dir(c.m["seed0"], tmp / "ft"), poison(W))
    return Case([c.m["aligned"], d], [d, W], out=tmp / "new" / "deeper" / "merged", absent=[tmp / "new"])


# regression: without --quiet, the rich progress bar wrote an empty line to a non-terminal stderr before the error
@case()
def failure_without_quiet(tmp, c):
    d = edit_tensors(copy_dir(c.m["seed0"], tmp / "ft"), poison(W))
    return Case([c.m["aligned"], d], [d, W], quiet=False)


@pytest.fixture(scope="module")
def refusals(request, ctx, tmp_path_factory):
    """Build the selected cases and run them through the CLI in the background, two at a time
    (each run spends ~1.5 s importing torch; the CPU has two cores): {name: (Case, Future)}."""
    wanted = [item.callspec.params["build"] for item in request.session.items
              if item.originalname == "test_bad_input_is_refused_in_one_line"]
    root = tmp_path_factory.mktemp("cases")

    def run(c: Case):
        return finish(cli(*c.args, "--out", c.out, *(["--quiet"] if c.quiet else [])))

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cli")
    jobs = {}
    for build in wanted:
        tmp = root / build.__name__
        tmp.mkdir()
        try:
            c = build(tmp, ctx)
        except Exception as e:  # reported by that case's test
            jobs[build.__name__] = (None, e)
            continue
        c.out = c.out or tmp / "merged"
        c.existed = c.out.exists()
        c.snapshots = {d: snapshot(d) for d in c.keep}
        jobs[build.__name__] = (c, pool.submit(run, c))
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def raises_with_debug(c: Case) -> None:
    """With --debug the error is not turned into one line but raised out of the command, so the
    CLI prints its traceback (the real-subprocess --debug runs below show that traceback).
    In-process: a second subprocess per case would double this module's time."""
    from typer.testing import CliRunner

    from safemerge.cli.main import app

    r = CliRunner().invoke(app, ["merge", *map(str, c.args), "--out", str(c.out), "--quiet", "--debug"])
    assert isinstance(r.exception, safemerge.SafemergeError) and r.exit_code != 0, (r.exception, r.output)


@pytest.mark.parametrize("build", CASES)
def test_bad_input_is_refused_in_one_line(build, refusals):
    c, job = refusals[build.__name__]
    if c is None:
        raise job
    check_refused(job.result(), None, c.out, *c.expect, out_existed=c.existed)
    for d, before in c.snapshots.items():
        assert snapshot(d) == before, f"{d} changed"
    for p in c.absent:
        assert not p.exists(), f"{p} was left behind"
    raises_with_debug(c)


# --- pickle checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def safetensors_merge(llama32, tmp_path_factory):
    """aligned + seed0 at λ=0.3, all safetensors: what a pickle version must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "merged"
    safemerge.merge(str(llama32["aligned"]), [str(llama32["seed0"])], out, lam=0.3, progress=False)
    return load_file(out / "model.safetensors")


def assert_same_tensors(out: Path, expected: dict):
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


def test_allow_pickle_loads_a_pickle_checkpoint(llama32, safetensors_merge, tmp_path):
    d = pickled(copy_dir(llama32["seed0"], tmp_path / "ft"))
    out = tmp_path / "merged"
    r = finish(cli(llama32["aligned"], d, "--out", out, "--lambda", "0.3", "--allow-pickle", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert_same_tensors(out, safetensors_merge)


# regression: --allow-pickle used torch.load(mmap=True), which refuses legacy (non-zip) torch.save files such as old pytorch_model.bin downloads, with a message about mmap
def test_allow_pickle_loads_a_legacy_pickle(llama32, safetensors_merge, tmp_path):
    d = copy_dir(llama32["seed0"], tmp_path / "ft")
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (d / "model.safetensors").unlink()
    out = tmp_path / "merged"
    r = finish(cli(llama32["aligned"], d, "--out", out, "--lambda", "0.3", "--allow-pickle", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert_same_tensors(out, safetensors_merge)


class OpensAFile:
    """Unpickling this calls open(path, "w"): code that weights_only=True must refuse to run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def code_pickle(llama32, tmp_path_factory):
    """A .bin that runs code when unpickled, merged with --allow-pickle (once, for two tests)."""
    tmp = tmp_path_factory.mktemp("code-pickle")
    d = copy_dir(llama32["seed0"], tmp / "ft")
    marker = tmp / "code-ran"
    state = load_file(d / "model.safetensors")
    state["payload"] = OpensAFile(marker)
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    out = tmp / "merged"
    plain, dbg = run_both([llama32["aligned"], d, "--allow-pickle"], out)
    return SimpleNamespace(bin=d / "pytorch_model.bin", marker=marker, out=out, plain=plain, debug=dbg)


def test_allow_pickle_refuses_code(code_pickle):
    check_refused(code_pickle.plain, code_pickle.debug, code_pickle.out, code_pickle.bin)
    assert not code_pickle.marker.exists(), "unpickling ran code"


# regression: the message was the first line of torch's UnpicklingError: ANSI escapes and 'This file can still be loaded, ... two options' (cut off), without the refused global (io.open)
def test_allow_pickle_refusal_names_the_refused_object(code_pickle):
    line = one_line(code_pickle.plain)
    assert "\x1b" not in line, repr(line)
    assert "io.open" in line, line


# --- interruption -------------------------------------------------------------------------


BIG = dict(hidden=1024, intermediate=2816, layers=6, vocab=8000)  # 374 MB of float32


@pytest.fixture(scope="module")
def big_model(llama32, tmp_path_factory):
    """A Llama-shaped float32 model big enough that merging it takes a few seconds. Its
    weights are a sparse file (zeros) written header-first, so it costs no time to build;
    the fine-tuned model is a hard-linked copy."""
    root = tmp_path_factory.mktemp("big")
    aligned = root / "aligned"
    aligned.mkdir()
    h, i, v = BIG["hidden"], BIG["intermediate"], BIG["vocab"]
    shapes = {"model.embed_tokens.weight": [v, h]}
    for n in range(BIG["layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + f"self_attn.{x}_proj.weight": [h, h] for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i]}
        shapes |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    shapes |= {"model.norm.weight": [h], "lm_head.weight": [v, h]}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(aligned / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    config = dict(json.loads((llama32["aligned"] / "config.json").read_text()), hidden_size=h, intermediate_size=i,
                  num_hidden_layers=BIG["layers"], num_attention_heads=16, num_key_value_heads=16, vocab_size=v)
    (aligned / "config.json").write_text(json.dumps(config))
    for f in llama32["aligned"].iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, aligned / f.name)
    tuned = root / "tuned"
    tuned.mkdir()
    for f in aligned.iterdir():
        os.link(f, tuned / f.name)
    return SimpleNamespace(aligned=aligned, tuned=tuned, nbytes=offset)


def wait_for_temporary(p: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Until the writer's temporary directory appears beside --out, i.e. writing has begun."""
    deadline = time.monotonic() + timeout
    while not any(".tmp-" in name for name in leftovers(out)):
        if p.poll() is not None:
            pytest.fail(f"safemerge ended (exit {p.returncode}) before writing; stderr:\n{p.stderr.read()}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail("no temporary output directory appeared")
        time.sleep(0.01)


@pytest.mark.parametrize("sig, existing", [
    pytest.param(signal.SIGINT, False, id="ctrl-c"),
    pytest.param(signal.SIGTERM, False, id="sigterm"),
    pytest.param(signal.SIGINT, True, id="ctrl-c-over-existing-output"),
])
def test_interrupted_merge_leaves_nothing(big_model, llama32, tmp_path, sig, existing):
    out = tmp_path / "merged"
    before = snapshot(copy_dir(llama32["seed1"], out)) if existing else None
    p = cli(big_model.aligned, big_model.tuned, "--out", out, "--quiet", *(["--force"] if existing else []))
    wait_for_temporary(p, out)
    p.send_signal(sig)
    r = finish(p, timeout=60)
    line = one_line(r)
    assert "interrupt" in line, line
    if existing:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert leftovers(out) == []


# --- full disk ------------------------------------------------------------------------------


class Mounts:
    """Small tmpfs file systems (needs root); a test that cannot mount one is skipped."""

    def __init__(self, root: Path):
        self.root, self.mounted = root, []

    def __call__(self, **options) -> Path:
        d = self.root / f"fs{len(self.mounted)}"
        d.mkdir()
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot mount a tmpfs: {e}")
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        self.mounted.append(d)
        return d

    def unmount_all(self):
        for d in self.mounted:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    mounts = Mounts(tmp_path)
    yield mounts
    mounts.unmount_all()


@pytest.fixture(scope="module")
def tiny_disk(llama32, tmp_path_factory):
    """A merge into a 2 MiB file system, run once for two tests."""
    mounts = Mounts(tmp_path_factory.mktemp("tiny-disk"))
    fs = mounts(size="2m")
    out = fs / "merged"
    plain, dbg = run_both([llama32["aligned"], llama32["seed0"]], out)
    yield SimpleNamespace(fs=fs, out=out, plain=plain, debug=dbg, free=os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize)
    mounts.unmount_all()


def test_full_disk_is_refused_up_front(tiny_disk):
    line = check_refused(tiny_disk.plain, tiny_disk.debug, tiny_disk.out, tiny_disk.fs)
    assert "space" in line, line


UNITS = {"b": 1, "bytes": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


# regression: sizes were always printed in GB with 2 decimals: 'needs 0.00 GB but ... has 0.00 GB free' for a small model and disk, and the 64 MiB headroom the check adds is not mentioned
def test_full_disk_message_gives_meaningful_sizes(tiny_disk):
    line = one_line(tiny_disk.plain)
    sizes = re.findall(r"(\d+(?:\.\d+)?)\s*(bytes|[kKMGT]i?B|B)\b", line)
    assert sizes and all(float(n) > 0 for n, _ in sizes), f"a size shows as zero: {line}"
    free = re.search(r"(\d+(?:\.\d+)?)\s*(bytes|[kKMGT]i?B|B)\s+free", line)
    assert free, line
    shown = float(free.group(1)) * UNITS[free.group(2).lower()]
    assert tiny_disk.free / 2 <= shown <= tiny_disk.free * 2, f"free space shown as {shown:.0f} B, is {tiny_disk.free} B"


def test_disk_fills_up_while_writing(big_model, tmpfs):
    """The file system passes the up-front check; once writing has begun it is shrunk to
    what is used plus 4 MiB (tmpfs remount), so a write fails with ENOSPC mid-shard."""
    fs = tmpfs(size=int(big_model.nbytes * 1.02) + (96 << 20))
    out = fs / "merged"
    p = cli(big_model.aligned, big_model.tuned, "--out", out, "--quiet")
    wait_for_temporary(p, out)
    for _ in range(100):
        st = os.statvfs(fs)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        shrink = subprocess.run(["mount", "-o", f"remount,size={used + (4 << 20)}", str(fs)], capture_output=True, text=True)
        if shrink.returncode == 0:
            break  # else the writer outgrew `used` meanwhile: try again
    else:
        p.kill()
        finish(p)
        pytest.skip(f"cannot shrink the tmpfs: {shrink.stderr.strip()}")
    line = one_line(finish(p, timeout=60))
    assert line.startswith("error: ") and "space" in line and str(fs) in line, line
    assert not out.exists()
    assert leftovers(out) == []


@pytest.mark.parametrize("free_inodes", [
    pytest.param(0, id="temporary-directory"),
    pytest.param(1, id="shard"),
    # regression: write_file opened the file outside its try, so ENOSPC on config.json was a traceback
    pytest.param(2, id="config-json"),
])
def test_no_room_for_a_new_file(llama32, tmpfs, free_inodes):
    """A file system out of inodes: creating the temporary directory, the shard or config.json fails with ENOSPC."""
    fs = tmpfs(size="128m", nr_inodes=64)
    for n in range(os.statvfs(fs).f_ffree - free_inodes):
        (fs / f"filler{n}").touch()
    assert os.statvfs(fs).f_ffree == free_inodes
    out = fs / "merged"
    line = assert_refused([llama32["aligned"], llama32["seed0"]], out, fs, debug=False)  # one run: they'd share inodes
    assert re.search(r"space|inode", line, re.IGNORECASE), line


def test_a_killed_runs_temporary_directory_is_cleaned_by_the_next_run(llama32, tmp_path):
    """kill -9 leaves `.<name>.tmp-<host>-<pid>`; the next write to that output removes it when
    its process is gone, and never touches a live process's work or other hosts'."""
    import socket

    from safemerge.merging.stream import merge

    out = tmp_path / "merged"
    dead = next(pid for pid in range(4_000_000, 3_000_000, -1) if not _alive(pid))
    host = socket.gethostname()
    stale = tmp_path / f".merged.tmp-{host}-{dead}"
    live = tmp_path / f".merged.tmp-{host}-{os.getppid()}"  # a running process's work
    not_ours = tmp_path / f".merged.tmp-{host}-{dead}x"  # not a pid
    other_host = tmp_path / f".merged.tmp-elsewhere-{dead}"
    for d in (stale, live, not_ours, other_host):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    merge(str(llama32["aligned"]), [str(llama32["seed0"])], out, lam=0.5, progress=False)
    assert not stale.exists() and live.exists() and not_ours.exists() and other_host.exists()
    assert (out / "model.safetensors").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
