"""Hub ids resolve through huggingface_hub; offline, from its cache (the tests never touch the network)."""

import os
import shutil
import subprocess
import sys

import torch
from reference import load_state, reference

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_as_hub_repo(cache, repo_id, model_dir):
    """Lay a model directory out as huggingface_hub caches a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def run(args, cache):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "safemerge", "merge", *map(str, args), "--quiet"], capture_output=True, text=True, env=env)


def test_hub_ids_resolve_from_the_cache(llama32, tmp_path):
    cache = tmp_path / "hub"
    cache_as_hub_repo(cache, "safety-org/aligned-chat", llama32["aligned"])
    cache_as_hub_repo(cache, "someone/chat-sft", llama32["seed0"])
    out = tmp_path / "merged"
    r = run(["safety-org/aligned-chat", "someone/chat-sft", "--out", out, "--lambda", "0.25"], cache)
    assert r.returncode == 0, r.stderr
    a, f, ours = load_state(llama32["aligned"]), load_state(llama32["seed0"]), load_state(out)
    for name in a:
        assert torch.allclose(ours[name].double(), reference("linear", name, a[name], [f[name]], lam=0.25), atol=1e-6)
    assert 'base_model: "safety-org/aligned-chat"' in (out / "README.md").read_text()


def test_unknown_hub_id_offline_is_one_clear_line(llama32, tmp_path):
    r = run([llama32["aligned"], "nobody/no-such-model", "--out", tmp_path / "out"], tmp_path / "empty-cache")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: nobody/no-such-model is not a local directory and could not be fetched from the Hub")
    assert not (tmp_path / "out").exists()
