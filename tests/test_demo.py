"""The demo in a reduced mode CI can afford: the default tiny aligned model (built into a
temporary cache under the demo's pinned numerics, in a subprocess as `safemerge demo` runs it), one
fine-tuning seed (the demo's own settings), linear merges at two λ values and the refinement between them. It
asserts that the build is the one the README's figures come from (its fingerprint), and the direction
of the phenomenon, read from the sweep's own results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safemerge.demo import tiny
from safemerge.demo.numerics import can_pin, pinned_environment
from safemerge.demo.run import DemoResult

REDUCED_DEMO = """
import sys
from pathlib import Path
from safemerge.demo.run import run_demo
run_demo(Path(sys.argv[1]), seeds=1, progress=False, methods=["linear"], lambdas=[0.2, 0.8], echo=lambda line: None)
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = {**pinned_environment(), "SAFEMERGE_CACHE": str(root / "cache")}
    r = subprocess.run([sys.executable, "-c", REDUCED_DEMO, str(root / "out")],
                       capture_output=True, text=True, env=env, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    built = json.loads((root / "cache" / "demo" / f"tiny-aligned-{tiny.VERSION}" / tiny.RECORD).read_text())
    out = root / "out"
    recorded = json.loads((out / "demo.json").read_text())
    results = json.loads((out / "run" / "results.json").read_text())
    return DemoResult(out, results, recorded["summary"], recorded["seconds"]), built


@pytest.mark.skipif(not can_pin(), reason="the demo's numerics are pinned on x86-64 only")
def test_the_tiny_model_is_the_one_the_readme_figures_come_from(demo):
    _, built = demo
    assert built["fingerprint"] == tiny.BUILD_FINGERPRINT, (
        "the tiny model's build drifted (another library version, or the world changed): run "
        "`python scripts/readme_demo.py`, then set tiny.BUILD_FINGERPRINT and bump tiny.VERSION")


def test_fine_tuning_erodes_refusals_and_merging_restores_them(demo):
    demo, _ = demo
    aligned, tuned, chosen = demo.summary["rows"]
    assert tuned["compliance"] >= aligned["compliance"] + 0.3, demo.summary
    assert chosen["compliance"] < tuned["compliance"], demo.summary
    assert tuned["task"] > aligned["task"], demo.summary
    assert chosen["model"].startswith("chosen: linear"), demo.summary


def test_the_demo_writes_what_it_promises(demo):
    demo, _ = demo
    run = demo.out / "run"
    for name in ("results.json", "report.md", "report.html", "plots/tradeoff.png", "merged/model.safetensors"):
        assert (run / name).exists(), name
    adapter = demo.out / "finetune" / "seed0"
    assert (adapter / "adapter_config.json").exists() and (adapter / "val.jsonl").exists()
    # every figure in the summary is the sweep's own: compliance is the chosen trial's report-part ASR
    results = json.loads((run / "results.json").read_text())
    chosen = next(t for t in results["trials"] if t["key"] == results["choice"]["chosen"]["trial"])
    harmful = next(s for s in chosen["safety"] if not s.startswith("xstest"))
    assert demo.summary["rows"][-1]["compliance"] == chosen["safety"][harmful]["report"]["asr"]["value"]


# `safemerge demo` as a user runs it, with run_demo's reduced settings (the test-size tiny model built
# into OUT, 20 fine-tuning steps, one linear merge, 8 prompts per set) so that it takes seconds
REDUCED_DEMO_COMMAND = """
import functools, sys
import safemerge.demo.run as run
from safemerge.cli.main import main
run.run_demo = functools.partial(run.run_demo, size="test", methods=["linear"], lambdas=[0.5],
                                 finetune_settings={"max_steps": 20}, sweep_settings={"max_new_tokens": 8, "limit": 8})
sys.argv = ["safemerge", "demo", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_demo_command_progress_is_one_bar_per_stage_or_nothing(tmp_path, quiet):
    """stderr is a pipe here: each stage's bar is written once, finished (the sweep's bar draws on a
    terminal only), and --quiet writes nothing there; stdout has the commands and the summary."""
    r = subprocess.run([sys.executable, "-c", REDUCED_DEMO_COMMAND, "--out", str(tmp_path / "out"), "--seeds", "1",
                        *(["--quiet"] if quiet else [])], check=False, capture_output=True, text=True, timeout=600,
                       env={**pinned_environment(), "SAFEMERGE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "$ safemerge finetune" in r.stdout and "safemerge demo (held-out report prompts)" in r.stdout
    if quiet:
        assert r.stderr == ""
    else:
        stages = [line.split(",")[0] for line in r.stderr.splitlines()]
        assert stages == ["tiny model: helpful", "tiny model: alignment", "training"], r.stderr[-2000:]


def test_building_the_tiny_model_leaves_torch_as_it_found_it(tmp_path):
    """The build's deterministic mode once leaked into the fine-tunes and the sweep that follow it in
    `safemerge demo`'s process and slowed them by a third."""
    import torch
    import torch.utils.deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    tiny.build_tiny_aligned(tmp_path / "tiny", progress=False, size="test")
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before
