"""End-to-end merges of tiny real models, checked against an independent reference."""

import importlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from reference import assert_matches, load_state, reference

import safemerge
from safemerge import METHODS
from safemerge.merging import methods

engine = importlib.import_module("safemerge.merging.stream")  # the module, not the function

KINDS = ["llama", "qwen2", "gemma"]
DTYPES = [torch.float32, torch.bfloat16]


def fine_tunes(paths, method, several):
    count = 3 if several or METHODS[method].min_models > 1 else 1
    return [paths[f"seed{i}"] for i in range(count)]


def params(method):
    takes = METHODS[method].parameters
    return {k: v for k, v in {"lam": 0.6, "density": 0.4}.items() if k in takes}


def check_against_reference(out, aligned, tuned, method, **p):
    a_state = load_state(aligned)
    t_states = [load_state(t) for t in tuned]
    ours = load_state(out)
    assert set(ours) == set(a_state)
    exact = 0
    for name, a in a_state.items():
        ref = reference(method, name, a, [t[name] for t in t_states], **p)
        assert ours[name].dtype == a.dtype
        exact += assert_matches(ours[name], ref, name)
    if next(iter(a_state.values())).dtype != torch.float32:
        assert exact / sum(t.numel() for t in a_state.values()) > 0.98


METHOD_INPUTS = [
    pytest.param(m, several, id=f"{m}-{'three' if several else 'one'}")
    for m in METHODS
    for several in (False, True)
    if several or METHODS[m].min_models == 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, several", METHOD_INPUTS)
def test_every_method_matches_the_reference(models, tmp_path, method, several, kind, dtype):
    paths = models[kind, dtype]
    tuned = fine_tunes(paths, method, several)
    out = tmp_path / "out"
    safemerge.merge(str(paths["aligned"]), [str(t) for t in tuned], out, method=method, progress=False, **params(method))
    p = params(method) | ({"seed": 42} if "draws" in METHODS[method].parameters else {})
    check_against_reference(out, paths["aligned"], tuned, method, **p)


@pytest.mark.parametrize("method", list(METHODS))
def test_streaming_in_small_chunks_matches_the_reference(models, tmp_path, monkeypatch, method):
    # real models are streamed in row chunks; tiny ones fit one chunk unless we shrink it
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(methods, "CHUNK", 64)
    paths = models["qwen2", torch.bfloat16]
    tuned = [paths["seed0"], paths["seed1"]]
    out = tmp_path / "out"
    safemerge.merge(str(paths["aligned"]), [str(t) for t in tuned], out, method=method, progress=False, **params(method))
    p = params(method) | ({"seed": 42} if "draws" in METHODS[method].parameters else {})
    check_against_reference(out, paths["aligned"], tuned, method, **p)


WHOLE_TENSOR_METHODS = [m for m in METHODS if METHODS[m].prepare]


def merge_two_ways(aligned, tuned, tmp_path, monkeypatch, method):
    """The merge with every tensor read whole, then with every tensor's statistics walked in chunks."""
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(methods, "CHUNK", 64)
    outs = []
    for whole_bytes in (1 << 40, 0):
        monkeypatch.setattr(engine, "WHOLE_BYTES", whole_bytes)
        outs.append(tmp_path / f"out-{whole_bytes}")
        safemerge.merge(str(aligned), [str(t) for t in tuned], outs[-1], method=method, progress=False, **params(method))
    return [load_state(o) for o in outs]


@pytest.mark.parametrize("method", WHOLE_TENSOR_METHODS)
def test_statistics_walked_in_chunks_equal_those_of_whole_tensors(models, tmp_path, monkeypatch, method):
    # a tensor too big to read whole (Gemma 3's 262k-row embeddings) gets its statistics from a chunked read
    paths = models["gemma", torch.bfloat16]
    tuned = [paths["seed0"], paths["seed1"]]
    whole, chunked = merge_two_ways(paths["aligned"], tuned, tmp_path, monkeypatch, method)
    assert set(whole) == set(chunked)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
    check_against_reference(tmp_path / "out-0", paths["aligned"], tuned, method, **params(method))


def test_nan_in_a_chunk_read_for_statistics_is_one_clear_error(models, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    paths = models["llama", torch.float32]
    fine = tmp_path / "ft"
    shutil.copytree(paths["seed0"], fine)
    state = load_file(fine / "model.safetensors")
    name = "model.embed_tokens.weight"
    state[name].view(-1)[-1] = math.nan  # in the last chunk: the statistics pass meets it first
    save_file(state, fine / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(engine, "WHOLE_BYTES", 0)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    with pytest.raises(safemerge.CheckpointError, match=rf"tensor {name} in {re.escape(str(fine))} contains NaN"):
        safemerge.merge(str(paths["aligned"]), [str(fine)], tmp_path / "out", method="ties", lam=0.5, density=0.4,
                        progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_output_loads_with_transformers_and_generates(models, tmp_path, kind, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = models[kind, dtype]
    out = tmp_path / "merged"
    safemerge.merge(str(paths["aligned"]), [str(paths["seed0"])], out, method="slerp", lam=0.3, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == dtype
    prompt = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|assistant|>")
    original = AutoTokenizer.from_pretrained(paths["aligned"])
    assert tok("w1 w2 w3 w7") == original("w1 w2 w3 w7")
    ids = torch.tensor([[1, 5, 9, 17]])
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)
    # the loaded weights are the merged ones, not re-initialised
    merged = load_state(out)
    for name, p in model.state_dict().items():
        if name in merged:
            assert torch.equal(p, merged[name]), name
    if kind == "gemma":  # tied embeddings stay tied
        assert "lm_head.weight" not in merged and model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_shards_index_and_config(models, tmp_path):
    paths = models["llama", torch.bfloat16]
    out = tmp_path / "merged"
    result = safemerge.merge(str(paths["aligned"]), [str(paths["seed0"])], out, shard_size="20KB", dtype="float32", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == result.files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    sizes = [(out / f).stat().st_size for f in files]
    merged = load_state(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in merged.values())
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert max(sizes) < 20_000 + 2 * max(t.numel() * 4 for t in merged.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    a, f = load_state(paths["aligned"]), load_state(paths["seed0"])
    for name in a:
        assert_matches(merged[name], reference("linear", name, a[name], [f[name]]), name)


def test_keep_aligned_copies_those_tensors_bit_for_bit(models, tmp_path):
    paths = models["llama", torch.bfloat16]
    out = tmp_path / "merged"
    safemerge.merge(str(paths["aligned"]), [str(paths["seed0"])], out, keep_aligned=[r"norm\.weight$", "embed"], progress=False)
    a, merged = load_state(paths["aligned"]), load_state(out)
    kept = [n for n in a if n.endswith("norm.weight") or "embed" in n]
    assert kept and all(torch.equal(merged[n], a[n]) for n in kept)
    assert not torch.equal(merged["lm_head.weight"], a["lm_head.weight"])


def test_fingerprints_ignore_sharding_and_see_content(models, tmp_path):
    paths = models["llama", torch.float32]
    resharded = tmp_path / "resharded"
    safemerge.merge(str(paths["aligned"]), [str(paths["aligned"])], resharded, shard_size="30KB", progress=False)
    one = safemerge.merge(str(paths["aligned"]), [str(paths["seed0"])], tmp_path / "a", progress=False).fingerprints
    two = safemerge.merge(str(resharded), [str(paths["seed1"])], tmp_path / "b", progress=False).fingerprints
    assert one[str(paths["aligned"])] == two[str(resharded)]  # same weights, other files
    assert one[str(paths["seed0"])] != two[str(paths["seed1"])]
    assert one[str(paths["aligned"])] != one[str(paths["seed0"])]


def test_model_card_records_provenance_and_its_command_reproduces_the_merge(models, tmp_path):
    paths = models["qwen2", torch.bfloat16]
    out = tmp_path / "merged"
    tuned = [str(paths["seed0"]), str(paths["seed1"])]
    result = safemerge.merge(str(paths["aligned"]), tuned, out, method="dare_ties", lam=0.7, density=0.3, seed=7, progress=False)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f'base_model: "{paths["aligned"]}"' in front and "- merge" in front and "- safemerge" in front
    for text in ("dare_ties", "0.7", "0.3", "| seed | 7 |", result.fingerprints[tuned[1]], safemerge_version()):
        assert text in card
    record = json.loads((out / "safemerge.json").read_text())
    assert record["parameters"] == {"lam": 0.7, "density": 0.3, "seed": 7}
    command = shlex.split(record["command"])
    assert command[:2] == ["safemerge", "merge"] and record["command"] in card
    again = tmp_path / "again"
    command[command.index("--out") + 1] = str(again)
    subprocess.run([sys.executable, "-m", "safemerge", *command[1:], "--quiet"], check=True)
    first, second = load_state(out), load_state(again)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_cli_merges_and_says_where(models, tmp_path):
    paths = models["gemma", torch.float32]
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, "-m", "safemerge", "merge", str(paths["aligned"]), str(paths["seed0"]), str(paths["seed1"]),
         "--out", str(out), "--method", "model_stock", "--quiet"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    check_against_reference(out, paths["aligned"], [paths["seed0"], paths["seed1"]], "model_stock")


def test_dry_run_checks_everything_and_writes_nothing(models, tmp_path):
    paths = models["llama", torch.bfloat16]
    out = tmp_path / "planned"
    args = [sys.executable, "-m", "safemerge", "merge", str(paths["aligned"]), str(paths["seed0"]), "--out", str(out)]
    run = subprocess.run([*args, "--method", "ties", "--shard-size", "20KB", "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    tensors = len(load_state(paths["aligned"]))
    assert run.stdout.startswith(f"would write {out}: ties (λ=0.5, density=0.5), {tensors} tensors")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    bad = subprocess.run([*args, "--method", "model_stock", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 1 and "model_stock needs at least 2" in bad.stderr


def test_help_texts_say_what_lambda_means():
    run = subprocess.run([sys.executable, "-m", "safemerge", "merge", "--help"], capture_output=True, text=True)
    assert "weight of the FINE-TUNED model" in " ".join(run.stdout.split())
    listing = subprocess.run([sys.executable, "-m", "safemerge", "methods"], capture_output=True, text=True).stdout
    assert all(name in listing for name in METHODS)


def safemerge_version():
    from safemerge.merging.card import version

    return version()
