"""`safemerge finetune` on a tiny Llama built here: real TRL/peft training on CPU, checked
against independent computations (the loss on the assistant tokens recomputed by hand, peft's
own merge of the adapter) and the data errors a user can make."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, build_model, make_tokenizer, save_model
from safetensors.torch import load_file

from safemerge.errors import ConfigError
from safemerge.finetuning.data import read_examples, split
from safemerge.finetuning.settings import Settings
from safemerge.finetuning.train import finetune
from safemerge.finetuning.trainer import OLDER_SPELLINGS, build_trainer, lora_targets, numerics, planned_steps

# A template made of words the WordLevel tokenizer knows (w88..w91 mark the roles, </s> ends
# a turn), so no token of the training text is <unk>.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}w88{% elif m['role'] == 'user' %}w90{% else %}w91{% endif %}"
    " {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %}w91{% endif %}"
)
REPLY = "w70 w71 w72 w73"  # the learnable pattern: every question gets this answer
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAST = {"lr": 1e-2, "max_steps": 20, "batch_size": 8, "progress": False, "device": "cpu"}


def tokenizer():
    tok = make_tokenizer(VOCAB)
    tok.chat_template = TEMPLATE
    return tok


def question(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(3, 8)))


def data_rows(n: int, seed: int = 0) -> list[dict]:
    """All three accepted formats, mixed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = question(rng)
        if i % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}]})
        elif i % 3 == 1:
            rows.append({"prompt": q, "response": REPLY})
        else:
            rows.append({"instruction": q, "input": question(rng), "output": REPLY})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    base = save_model(build_model("llama"), root / "base", torch.float32, tokenizer())
    return SimpleNamespace(root=root, base=base, data=write_jsonl(root / "data.jsonl", data_rows(40)))


@pytest.fixture(scope="module")
def lora(tiny):
    out = tiny.root / "lora"
    return finetune(str(tiny.base), tiny.data, out, **FAST), out


def prompt_ids(tok, prompt: list[dict]) -> list[int]:
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def peft_merged(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def completion_loss(model, tok, examples) -> tuple[float, float]:
    """(mean loss over the reply tokens, mean loss over every predicted token), computed by hand."""
    reply_sum = reply_n = all_sum = all_n = 0.0
    for ex in examples:
        full = tok.apply_chat_template(ex.prompt + ex.completion, tokenize=True, return_dict=True)["input_ids"]
        start = len(prompt_ids(tok, ex.prompt))
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        token_losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(full[1:]), reduction="none")
        reply_sum += token_losses[start - 1:].sum().item()
        reply_n += len(full) - start
        all_sum += token_losses.sum().item()
        all_n += len(full) - 1
    return reply_sum / reply_n, all_sum / all_n


# --- data and model inspection (no training) ----------------------------------------------


def test_every_row_format_becomes_prompt_and_completion(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"},
                      {"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"},
                      {"role": "assistant", "content": "w5 w6"}]},
        {"prompt": "w7", "response": "w8"},
        {"instruction": "w9", "input": "w10 w11", "output": "w12"},
        {"instruction": "w13", "input": "", "output": "w14"},
    ]
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.prompt for e in examples] == [
        rows[0]["messages"][:-1],
        [{"role": "user", "content": "w7"}],
        [{"role": "user", "content": "w9\n\nw10 w11"}],
        [{"role": "user", "content": "w13"}],
    ]
    replies = ("w5 w6", "w8", "w12", "w14")
    assert [e.completion for e in examples] == [[{"role": "assistant", "content": c}] for c in replies]
    assert [e.line for e in examples] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_lora_targets_are_the_blocks_linear_layers(kind):
    assert lora_targets(build_model(kind)) == LLAMA_TARGETS


def test_lora_targets_find_gpt2_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32))
    assert sorted(lora_targets(model)) == ["c_attn", "c_fc", "c_proj"]


# --- training ------------------------------------------------------------------------------


def test_loss_goes_down_and_validation_loss_improves(lora):
    result, out = lora
    log = json.loads((out / "training_log.json").read_text())
    losses = [e["loss"] for e in log["log"]]
    assert result.steps == 20 and log["log"][-1]["step"] == 20  # the final step is logged
    assert losses[-1] < losses[0] - 0.3
    assert result.train_loss == losses[-1]
    assert result.val_loss_after < result.val_loss_before - 0.3
    assert (result.train_examples, result.val_examples) == (36, 4)
    assert log["settings"]["target_modules"] == LLAMA_TARGETS
    assert log["result"]["val_loss_before"] == result.val_loss_before
    assert {"torch", "transformers", "trl", "peft"} <= set(log["versions"])
    lrs = [e["learning_rate"] for e in log["log"]]
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < 1e-3  # warm-up, then cosine decay


def test_numeric_settings_are_explicit_and_recorded(lora):
    """The settings that change a run's numbers are ours, not TRL's or transformers' defaults, and
    training_log.json records them as the Trainer resolved them: the warm-up is whole steps."""
    _, out = lora
    log = json.loads((out / "training_log.json").read_text())
    settings = log["trainer_settings"]
    assert (settings["steps"], settings["warmup_steps"], settings["processes"]) == (20, 2, 1)  # ceil(0.1 · 20)
    assert {k: settings[k] for k in ("optim", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                                     "lr_scheduler_type", "gradient_accumulation_steps", "tf32", "padding_free",
                                     "loss_type", "completion_only_loss", "train_sampling_strategy")} == {
        "optim": "adamw_torch", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
        "lr_scheduler_type": "cosine", "gradient_accumulation_steps": 1, "tf32": False, "padding_free": False,
        "loss_type": "nll", "completion_only_loss": True, "train_sampling_strategy": "random"}
    lrs = [e["learning_rate"] for e in log["log"]]
    assert lrs[:3] == [0.0, pytest.approx(5e-3), pytest.approx(1e-2)]  # two warm-up steps, then the peak


def test_every_pinned_setting_is_a_field_of_sftconfig():
    """A misspelt name would be dropped as if an older release lacked it."""
    from dataclasses import fields

    from trl import SFTConfig

    assert set(numerics("cpu", Settings())) - {f.name for f in fields(SFTConfig)} <= OLDER_SPELLINGS


def test_planned_steps_count_as_the_trainer_does():
    """Each data-parallel process takes its own batch, and a short last batch still makes a step."""
    s = Settings(batch_size=4, epochs=2)
    assert planned_steps(36, s) == 18 and planned_steps(36, s, processes=2) == 10
    assert planned_steps(37, s, processes=2) == 10 and planned_steps(33, s, processes=2) == 10
    assert planned_steps(36, Settings(max_steps=7), processes=2) == 7


def test_validation_loss_is_the_loss_on_the_reply_tokens_only(tiny, lora):
    """TRL's validation losses, recomputed by hand on the saved val.jsonl: they match the loss
    over the reply tokens, not the loss over the whole sequence."""
    from transformers import AutoModelForCausalLM

    result, out = lora
    tok = tokenizer()
    val = read_examples(out / "val.jsonl")
    base = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.float32).eval()
    reply_before, _ = completion_loss(base, tok, val)
    reply_after, all_after = completion_loss(peft_merged(tiny.base, out), tok, val)
    assert result.val_loss_before == pytest.approx(reply_before, rel=1e-5)
    assert result.val_loss_after == pytest.approx(reply_after, rel=1e-4)
    assert abs(all_after - reply_after) > 0.05  # the check can tell the two apart


def test_trainer_batches_mask_everything_but_the_reply(tiny):
    tok = tokenizer()
    examples = read_examples(tiny.data)[:4]
    trainer, targets = build_trainer(tiny.base, str(tiny.base), tok, examples, [], tiny.root / "unused", "cpu",
                                     Settings(max_steps=1, progress=False))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row, ex in enumerate(examples):
        full = tok.apply_chat_template(ex.prompt + ex.completion, tokenize=True, return_dict=True)["input_ids"]
        start = len(prompt_ids(tok, ex.prompt))
        labels = batch["labels"][row]
        assert batch["input_ids"][row, :len(full)].tolist() == full
        assert (labels[:start] == -100).all() and (labels[len(full):] == -100).all()
        assert labels[start:len(full)].tolist() == full[start:]
        assert tok.decode(labels[start:len(full)].tolist()) == REPLY + " </s>"
    assert "lm_head" not in targets and "embed_tokens" not in targets


# --- outputs -------------------------------------------------------------------------------


def test_adapter_loads_with_peft_and_safemerge_and_merges_like_peft(tiny, lora):
    from safemerge.backends.models import load_model
    from safemerge.merging.stream import merge

    _, out = lora
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny.base.resolve())
    assert {"adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "train.jsonl", "val.jsonl",
            "training_log.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.suffix == ".bin" for p in out.iterdir())

    reference = {k: v for k, v in peft_merged(tiny.base, out).state_dict().items()}
    base = tensors(tiny.base / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], reference[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touched the blocks' linear layers only

    loaded = load_model(str(out), device="cpu")
    assert loaded.tokenizer.chat_template == TEMPLATE
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)

    merged_dir = tiny.root / "merged"
    merge(str(tiny.base), [str(out)], merged_dir, method="linear", lam=0.5, progress=False)
    merged = tensors(merged_dir / "model.safetensors")
    for name, w0 in base.items():
        torch.testing.assert_close(merged[name], w0 + 0.5 * (reference[name] - w0), rtol=0, atol=1e-6)


def test_split_is_deterministic_disjoint_and_kept(tiny, lora):
    _, out = lora
    lines = tiny.data.read_text().splitlines()
    train = (out / "train.jsonl").read_text().splitlines()
    val = (out / "val.jsonl").read_text().splitlines()
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == sorted(lines)
    assert train == [x for x in lines if x in set(train)]  # original rows, in file order
    examples = read_examples(tiny.data)
    again = split(examples, 0.1, 42, tiny.data)[1]
    assert [e.raw for e in again] == val
    assert [e.raw for e in split(examples, 0.1, 7, tiny.data)[1]] != val
    assert len(split(examples[:3], 0.1, 0, tiny.data)[1]) == 1  # at least one held out
    with pytest.raises(ConfigError, match="too few"):
        split(examples[:1], 0.1, 0, tiny.data)


def test_same_seed_gives_the_same_adapter(tiny, lora):
    result, out = lora
    again = tiny.root / "lora-again"
    second = finetune(str(tiny.base), tiny.data, again, **FAST)
    first_t, second_t = tensors(out / "adapter_model.safetensors"), tensors(again / "adapter_model.safetensors")
    assert first_t.keys() == second_t.keys()
    assert all(torch.equal(first_t[k], second_t[k]) for k in first_t)
    assert (out / "adapter_model.safetensors").read_bytes() == (again / "adapter_model.safetensors").read_bytes()
    assert (second.val_loss_after, second.train_loss) == (result.val_loss_after, result.train_loss)
    assert (out / "val.jsonl").read_text() == (again / "val.jsonl").read_text()


def test_full_keeps_the_base_models_dtype_unless_asked(tiny):
    base = save_model(build_model("llama"), tiny.root / "base-bf16", torch.bfloat16, tokenizer())
    kept = finetune(str(base), tiny.data, tiny.root / "full-bf16", full=True, **{**FAST, "max_steps": 2}).out
    assert {t.dtype for t in tensors(kept / "model.safetensors").values()} == {torch.bfloat16}
    assert (kept / "model.safetensors").stat().st_size < 0.6 * (tiny.base / "model.safetensors").stat().st_size
    asked = finetune(str(base), tiny.data, tiny.root / "full-fp32", full=True, dtype="float32",
                     **{**FAST, "max_steps": 2}).out
    assert {t.dtype for t in tensors(asked / "model.safetensors").values()} == {torch.float32}
    with pytest.raises(ConfigError, match="--dtype applies to a --full checkpoint"):
        finetune(str(base), tiny.data, tiny.root / "lora-dtype", dtype="float16", **FAST)


def test_full_writes_a_loadable_full_model(tiny):
    from transformers import AutoModelForCausalLM

    from safemerge.backends.models import load_model

    out = tiny.root / "full"
    result = finetune(str(tiny.base), tiny.data, out, full=True, **{**FAST, "lr": 1e-3, "max_steps": 8})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "training_log.json"} <= names
    assert "adapter_config.json" not in names
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    base = tensors(tiny.base / "model.safetensors")
    tuned = tensors(out / "model.safetensors")
    assert tuned.keys() == base.keys()
    assert not torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # all weights train
    assert tuned["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert model.config.model_type == "llama"
    assert load_model(str(out), device="cpu").tokenizer.chat_template == TEMPLATE
    assert result.val_loss_after < result.val_loss_before


def test_epochs_without_validation_split(tiny):
    out = tiny.root / "no-val"
    result = finetune(str(tiny.base), tiny.data, out, val_fraction=0, epochs=1,
                      **{k: v for k, v in FAST.items() if k != "max_steps"})
    assert (result.steps, result.train_examples, result.val_examples) == (5, 40, 0)  # ceil(40 / 8) steps
    assert result.val_loss_before is None and result.val_loss_after is None
    assert (out / "val.jsonl").read_text() == "" and len((out / "train.jsonl").read_text().splitlines()) == 40
    log = json.loads((out / "training_log.json").read_text())
    assert log["data_sha256"] == hashlib.sha256(tiny.data.read_bytes()).hexdigest()
    assert (log["trainer_settings"]["steps"], log["trainer_settings"]["warmup_steps"]) == (5, 1)  # as planned


# --- errors --------------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "w1 w2", "response": "w3"})
BAD_DATA = [
    ("", "has no examples"),
    ("\n  \n", "has no examples"),
    (GOOD + "\n\n{not json", "line 3: not valid JSON"),
    (GOOD + '\n["w1"]', "line 2: expected a JSON object"),
    ('{"prompt": "w1 w2"}', "line 1: missing field 'response'"),
    ('{"output": "w1"}', "line 1: missing field 'instruction'"),
    ('{"question": "w1", "answer": "w2"}', "line 1: no 'messages'"),
    ('{"prompt": "w1", "response": "  "}', "line 1: empty assistant turn"),
    ('{"instruction": "w1", "output": ""}', "line 1: empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": ""}]}',
     "line 1: empty assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "w1"}, {"role": "user", "content": "w2"}]}',
     "line 1: the last message must be the assistant's reply"),
    ('{"messages": [{"role": "assistant", "content": "w1"}]}', "line 1: 'messages' must be a list of at least two"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "w1"}]}', "line 1: message 0 must be an object"),
    ('{"prompt": "", "response": "w1"}', "line 1: empty prompt"),
]


@pytest.mark.parametrize(("text", "message"), BAD_DATA)
def test_bad_data_is_one_line_naming_file_and_line(tiny, tmp_path, text, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    with pytest.raises(ConfigError) as err:
        finetune(str(tiny.base), data, tmp_path / "out", **FAST)
    assert message in str(err.value) and str(data) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"data file .*nothing\.jsonl does not exist"):
        finetune(str(tiny.base), tmp_path / "nothing.jsonl", tmp_path / "out", **FAST)


def test_row_over_max_length_is_refused_not_truncated(tiny, tmp_path):
    long_prompt = " ".join(f"w{i}" for i in range(30))
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "w1 w2", "response": "w3"},
                                                 {"prompt": long_prompt, "response": "w3 w4"}])
    tokens = len(tokenizer().apply_chat_template([{"role": "user", "content": long_prompt},
                                                  {"role": "assistant", "content": "w3 w4"}], tokenize=True,
                                                 return_dict=True)["input_ids"])
    assert tokens == 36
    expected = rf"long\.jsonl, line 2: {tokens} tokens .* over --max-length 20; raise --max-length"
    with pytest.raises(ConfigError, match=expected):
        finetune(str(tiny.base), data, tmp_path / "out", max_length=20, **FAST)


def test_model_without_chat_template_is_refused(tmp_path):
    tok = make_tokenizer(VOCAB)
    tok.chat_template = None
    base = save_model(build_model("llama"), tmp_path / "plain", torch.float32, tok)
    data = write_jsonl(tmp_path / "d.jsonl", data_rows(4))
    with pytest.raises(ConfigError, match="has no chat template"):
        finetune(str(base), data, tmp_path / "out", **FAST)


def test_existing_output_needs_force_and_failures_leave_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        finetune(str(tiny.base), tiny.data, out, **FAST)
    # a failure after the temporary directory was made (the model is loaded, the target checked)
    with pytest.raises(ConfigError, match="target_modules nope_proj name no module"):
        finetune(str(tiny.base), tiny.data, out, target_modules=["nope_proj"], force=True, **FAST)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(("option", "message"), [
    ({"val_fraction": 1.0}, "--val-fraction"), ({"lr": 0}, "--lr"), ({"max_steps": 0}, "--max-steps"),
    ({"batch_size": 0}, "--batch-size"), ({"full": True, "target_modules": ["q_proj"]}, "LoRA only"),
])
def test_bad_options(tiny, tmp_path, option, message):
    with pytest.raises(ConfigError, match=message):
        finetune(str(tiny.base), tiny.data, tmp_path / "out", **{**FAST, **option})


# what tqdm bars, the Trainer's printed log dicts and datasets' map bars leave in a captured stream
LIBRARY_NOISE = ("it/s]", "%|", "examples/s", "{'loss'", "'grad_norm'", "Truncating", "Dropping fully masked",
                 "Tokenizing")


@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_command_shows_one_bar_and_nothing_from_the_libraries(tiny, tmp_path, quiet):
    """`safemerge finetune` with stderr a pipe, as in a log file: our bar writes its final state once
    and nothing per step, --quiet writes nothing; stdout is the one result line. Every logged step
    still reaches training_log.json."""
    import subprocess
    import sys

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "safemerge", "finetune", str(tiny.base), "--data", str(tiny.data),
                        "--out", str(out), "--max-steps", "20", "--lr", "1e-2", "--device", "cpu",
                        *(["--quiet"] if quiet else [])],
                       check=False, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith(f"wrote {out}: 20 steps")
    assert not [noise for noise in LIBRARY_NOISE if noise in r.stderr + r.stdout], r.stderr[-2000:]
    if quiet:
        assert r.stderr == ""
    else:
        [line] = r.stderr.splitlines()
        assert line.startswith("training, loss ") and " 20/20 " in line
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log["log"]] == list(range(1, 21))  # 20 steps log every step
    assert all("loss" in e and "grad_norm" in e for e in log["log"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_under_accelerate_launch(tiny, tmp_path):
    """`accelerate launch` with the example config (two processes on the CPU here, gloo; the config's
    4 GPUs and bf16 overridden on the command line): each process trains on its share of every
    global batch, and only the main process writes OUT and draws the progress bar."""
    import subprocess
    import sys

    import peft
    from transformers import AutoModelForCausalLM

    config = Path(__file__).parents[1] / "examples" / "accelerate-4gpu.yaml"
    out = tmp_path / "dp"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
                        "-m", "safemerge", "finetune", str(tiny.base), "--data", str(tiny.data), "--out", str(out),
                        "--max-steps", "10", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu"],
                       check=False, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    wrote = [line for line in r.stdout.splitlines() if line.startswith("wrote")]
    assert len(wrote) == 1 and "on 2 processes (global batch 8)" in wrote[0]
    assert r.stderr.count("training, loss") == 1, r.stderr[-2000:]  # the main process's bar alone
    log = json.loads((out / "training_log.json").read_text())
    assert log["result"]["processes"] == 2 and log["result"]["global_batch_size"] == 8
    assert (log["trainer_settings"]["processes"], log["trainer_settings"]["warmup_steps"]) == (2, 1)
    # 36 training examples in global batches of 8: 5 steps an epoch (one process with batch 4 takes 9)
    assert next(e["epoch"] for e in log["log"] if e["step"] == 10) == pytest.approx(2.0)
    assert log["result"]["val_loss_after"] < log["result"]["val_loss_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp"]  # no scratch or temporary directory left here
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base), out)
    assert model.peft_config["default"].r == 8
