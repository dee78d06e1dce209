"""`safemerge evaluate` end to end on tiny real models: generation, judging, scoring, results,
the cache, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, lora_adapter, make_tokenizer, save_model
from test_bertscore import tiny_bert  # noqa: F401  (a fixture)

from safemerge.evaluation.judges import REFUSAL_KEYWORDS, xstest_label
from safemerge.evaluation.run import evaluate
from safemerge.evaluation.stats import wilson
from safemerge.evaluation.tasks.scorers import extract_number

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny chat model, a tiny 'judge' model, and prompt and task files of our own."""
    root = tmp_path_factory.mktemp("evaluate")
    model = save_model(build_model("llama", seed=5), root / "model", torch.float32)
    judge = save_model(build_model("llama", seed=6), root / "judge", torch.float32)
    harmful = root / "harmful.csv"
    harmful.write_text("goal,target\n" + "".join(f"w{10 + i} w{20 + i} w{30 + 2 * i},x\n" for i in range(12)))
    hexphi = root / "hexphi"
    hexphi.mkdir()
    for c in (1, 2):
        (hexphi / f"category_{c}.csv").write_text("".join(f"w{40 + c} w{i} w{50 + i}\n" for i in range(5)))
    xstest = root / "xstest.csv"
    xstest.write_text("id,prompt,type,label,focus,note\n" + "".join(
        f"{i},w{i} w{60 + i},{'homonyms' if i % 2 else 'contrast_homonyms'},{'safe' if i % 2 else 'unsafe'},f,n\n"
        for i in range(1, 9)))
    gsm = root / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"w{i} w{i + 1}", "answer": f"w3\n#### {i}"}) + "\n" for i in range(6)))
    keywords = root / "keywords.txt"
    keywords.write_text("# a token this random model emits in some responses only\nw43\n")
    return {"root": root, "model": model, "judge": judge, "harmful": harmful, "hexphi": hexphi, "xstest": xstest,
            "gsm": gsm, "keywords": keywords}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEMERGE_CACHE": str(Path(cwd or ".").resolve() / "cache")}
    return subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_keyword_asr_from_responses_to_results(files, tmp_path):
    result = evaluate(str(files["model"]), tmp_path / "out", safety=[f"file:{files['harmful']}", f"hexphi:{files['hexphi']}"],
                      judge=f"keyword:{files['keywords']}", max_new_tokens=12, batch_size=4, cache_dir=tmp_path / "cache",
                      progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results == json.loads(json.dumps(result.results))
    assert results["model"]["fingerprint"].startswith("xxh3-128:") and results["model"]["system_prompt"] == "system_turn"
    assert results["judge"]["name"] == "keyword"
    for name, n in (("file:harmful.csv", 12), ("hexphi", 10)):
        record = results["safety"][name]
        responses = rows(tmp_path / "out" / record["responses"])
        assert len(responses) == n == record["n"]
        harmful = sum(not any(k in r["response"] for k in ("w43",)) for r in responses)  # recomputed here
        assert record["asr"] == wilson(harmful, n).to_dict()
        assert 0 < record["asr"]["value"] < 1, "the keyword file should split the responses"
        verdicts = rows(tmp_path / "out" / record["judgements"])
        assert [v["harmful"] for v in verdicts] == [not any(k in r["response"] for k in ("w43",)) for r in responses]
        assert record["generation"]["repetition_penalty"] == 1.2 and record["generation"]["max_new_tokens"] == 12
    by_category = results["safety"]["hexphi"]["by_category"]
    assert set(by_category) == {"category_1", "category_2"} and all(c["n"] == 5 for c in by_category.values())
    assert results["safety"]["file:harmful.csv"]["sha256"] != results["safety"]["hexphi"]["sha256"]


def test_default_keyword_list_and_xstest_rule(files, tmp_path):
    evaluate(str(files["model"]), tmp_path / "out", safety=[f"file:{files['harmful']}", f"xstest:{files['xstest']}"],
             judge="keyword", max_new_tokens=6, cache_dir=tmp_path / "cache", progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    responses = rows(tmp_path / "out" / results["safety"]["file:harmful.csv"]["responses"])
    harmful = sum(not any(k in r["response"] for k in REFUSAL_KEYWORDS) for r in responses)
    assert results["safety"]["file:harmful.csv"]["asr"] == wilson(harmful, 12).to_dict()
    xs = results["safety"]["xstest"]
    answers = rows(tmp_path / "out" / xs["responses"])
    safe = [r for r in answers if int(r["id"].split("/")[-1]) % 2]
    refused = sum(xstest_label(r["response"]) == "full_refusal" for r in safe)
    assert xs["over_refusal"] == wilson(refused, 4).to_dict() and xs["n_safe"] == 4 and xs["n_unsafe"] == 4


def test_a_random_judge_model_gives_parse_errors_not_a_crash(files, tmp_path):
    for judge in ("wildguard", "llamaguard"):
        out = tmp_path / judge
        evaluate(str(files["model"]), out, safety=[f"file:{files['harmful']}"], judge=f"{judge}:{files['judge']}",
                 max_new_tokens=4, limit=5, cache_dir=tmp_path / "cache", progress=False)
        record = json.loads((out / "results.json").read_text())["safety"]["file:harmful.csv"]
        judged = rows(out / record["judgements"])
        errors = sum(v["parse_error"] for v in judged)
        assert record["parse_errors"] == errors and record["n"] == 5
        assert errors == 5, "a random model cannot write a verdict"  # every output is junk: counted, not fatal
        assert record["asr"]["n"] == 0 and all(v["raw"] is not None for v in judged)


def test_gsm8k_task_scored_from_the_responses(files, tmp_path):
    evaluate(str(files["model"]), tmp_path / "out", tasks=[f"gsm8k:{files['gsm']}"], max_new_tokens=8,
             cache_dir=tmp_path / "cache", progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    task = results["tasks"]["gsm8k"]
    answers = rows(tmp_path / "out" / task["responses"])
    correct = sum(extract_number(r["response"]) == str(i) for i, r in enumerate(answers))
    assert task["metrics"]["accuracy"] == wilson(correct, 6).to_dict()
    assert task["generation"]["repetition_penalty"] == 1.0 and task["primary"] == "accuracy"
    assert all("extracted" in r and "correct" in r for r in answers)


def test_the_cache_makes_a_repeat_free(files, tmp_path):
    args = dict(safety=[f"file:{files['harmful']}"], judge="keyword", max_new_tokens=6, cache_dir=tmp_path / "cache",
                progress=False)
    first = evaluate(str(files["model"]), tmp_path / "a", **args).results
    second = evaluate(str(files["model"]), tmp_path / "b", **args).results
    assert first["safety"]["file:harmful.csv"]["cache_hits"] == 0
    assert second["safety"]["file:harmful.csv"]["cache_hits"] == 12
    assert rows(tmp_path / "a" / "responses" / "file_harmful.csv.jsonl") == rows(tmp_path / "b" / "responses" / "file_harmful.csv.jsonl")


def test_a_lora_adapter_is_evaluated_on_its_base(files, tmp_path):
    base = build_model("llama", seed=5)
    adapter = lora_adapter(base, tmp_path / "adapter", seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(files["model"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    make_tokenizer(96).save_pretrained(adapter)
    results = evaluate(str(adapter), tmp_path / "out", safety=[f"file:{files['harmful']}"], judge="keyword",
                       max_new_tokens=4, limit=3, cache_dir=tmp_path / "cache", progress=False).results
    assert "+lora:xxh3-128:" in results["model"]["fingerprint"]


@pytest.mark.skipif(not (SHARED / "advbench").exists(), reason="../shared/data is not here")
def test_cli_on_the_real_sets(files, tmp_path):
    r = run_cli("evaluate", str(files["model"]), "--out", str(tmp_path / "out"),
                "--safety", f"advbench:{SHARED / 'advbench' / 'harmful_behaviors.csv'}",
                "--safety", f"xstest:{SHARED / 'xstest' / 'xstest_prompts.csv'}",
                "--task", f"bbh:{SHARED / 'bbh'}:boolean_expressions", "--limit", "3", "--max-new-tokens", "4",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ASR" in r.stdout and "wrote" in r.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["safety"]["advbench"]["n"] == 3 and results["tasks"]["bbh/boolean_expressions"]["n"] == 3
    assert results["command"].startswith("safemerge evaluate")


BAD_INPUTS = [
    (["--safety", "nosuchset"], "unknown safety prompt set"),
    (["--safety", "file:{root}/missing.csv"], "does not exist"),
    (["--safety", "file:{root}/harmful.csv:nocolumn"], "nocolumn"),
    (["--safety", "file:{root}/harmful.csv", "--judge", "oracle"], "unknown judge"),
    (["--safety", "file:{root}/harmful.csv", "--judge", "keyword:{root}/nokeywords.txt"], "nokeywords.txt"),
    (["--task", "nosuchtask"], "unknown task"),
    (["--task", "humaneval:{root}/he.jsonl"], "--allow-code-execution"),
    (["--safety", "file:{root}/harmful.csv", "--device", "cuda"], "CUDA is not available"),
    ([], "nothing to evaluate"),
    (["--task", "gsm8k:{root}/gsm.jsonl", "--pass-k", "1,5"], "--pass-k"),
    (["--safety", "file:{root}/harmful.csv", "--backend", "vllm"], "vllm"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_line(files, tmp_path, args, message):
    he = files["root"] / "he.jsonl"
    he.write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                              "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"}) + "\n")
    args = [a.format(root=files["root"]) for a in args]
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if "vllm" in args:
        import importlib.util

        if importlib.util.find_spec("vllm"):
            pytest.skip("vllm is installed here")
    r = run_cli("evaluate", str(files["model"]), "--out", str(tmp_path / "out"), *args, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_or_chat_template(files, tmp_path):
    bare = tmp_path / "bare"
    build_model("llama").save_pretrained(bare)
    r = run_cli("evaluate", str(bare), "--out", str(tmp_path / "o1"), "--safety", f"file:{files['harmful']}", cwd=tmp_path)
    assert r.returncode == 1 and "no tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    tokenizer = make_tokenizer(96)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    r = run_cli("evaluate", str(bare), "--out", str(tmp_path / "o2"), "--safety", f"file:{files['harmful']}", cwd=tmp_path)
    assert r.returncode == 1 and "--chat-template" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    r = run_cli("evaluate", str(bare), "--out", str(tmp_path / "o3"), "--safety", f"file:{files['harmful']}",
                "--chat-template", str(template), "--limit", "2", "--max-new-tokens", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o3" / "results.json").read_text())["model"]["chat_template"] == str(template)


def test_bertscore_file_task_through_evaluate(files, tiny_bert, tmp_path):  # noqa: F811 (the imported fixture)
    pytest.importorskip("bert_score")
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer
    from safemerge.evaluation.tasks.builtin import load_file_task

    data = tmp_path / "summaries.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 2}", "reference": "the cat sat on the mat"}) + "\n"
                            for i in range(4)))
    results = evaluate(str(files["model"]), tmp_path / "out", tasks=[f"file:{data}:bertscore"], max_new_tokens=5,
                       bertscore_model=str(tiny_bert), bertscore_layer=2, cache_dir=tmp_path / "cache",
                       progress=False).results
    task = results["tasks"]["file:summaries.jsonl"]
    answers = rows(tmp_path / "out" / task["responses"])
    direct = BertScoreScorer(model=str(tiny_bert), layer=2).score(
        load_file_task(str(data)).items, [[r["response"]] for r in answers])
    assert task["scorer"] == "bertscore" and task["metrics"]["bertscore_f1"] == direct.metrics["bertscore_f1"].to_dict()
    assert [r["f1"] for r in answers] == [r["f1"] for r in direct.per_item]


def test_lm_eval_task_through_evaluate(files, tmp_path):
    pytest.importorskip("lm_eval")
    from safemerge.backends.models import load_model
    from safemerge.evaluation.tasks.lm_eval import run_lm_eval

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": f"w{i} w{i + 1}", "choices": ["w5", "w6", "w7"], "label": i % 3}) + "\n"
                            for i in range(6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: sm_eval_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {tmp_path / 'hf'}\ntest_split: test\ndoc_to_text: '{{{{q}}}}'\noutput_type: multiple_choice\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    results = evaluate(str(files["model"]), tmp_path / "out", tasks=["lm-eval:sm_eval_mc"], lm_eval_include=tasks,
                       cache_dir=tmp_path / "cache", progress=False).results
    record = results["tasks"]["lm-eval:sm_eval_mc"]
    loaded = load_model(str(files["model"]), device="cpu")
    direct = run_lm_eval(loaded.model, loaded.tokenizer, ["sm_eval_mc"], include_path=str(tasks))["sm_eval_mc"]
    assert record["primary"] == "acc" and record["n"] == 6
    assert record["metrics"]["acc"] == direct.metrics["acc"].to_dict()
    assert len(rows(tmp_path / "out" / record["responses"])) == 6
    r = run_cli("evaluate", str(files["model"]), "--out", str(tmp_path / "bad"), "--task", "lm-eval:no_such_task_xyz",
                "--lm-eval-include", str(tasks), cwd=tmp_path)
    assert r.returncode == 1 and "unknown lm-eval task" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_humaneval_runs_the_model_code_only_when_allowed(files, tmp_path):
    he = tmp_path / "he.jsonl"
    he.write_text("".join(json.dumps({"task_id": f"t/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n",
                                      "test": f"def check(f):\n    assert f() == {i}\n", "entry_point": f"f{i}"}) + "\n"
                          for i in range(3)))
    results = evaluate(str(files["model"]), tmp_path / "out", tasks=[f"humaneval:{he}"], samples=2, pass_k=[1, 2],
                       temperature=1.0, max_new_tokens=6, allow_code_execution=True, cache_dir=tmp_path / "cache",
                       progress=False).results
    task = results["tasks"]["humaneval"]
    answers = rows(tmp_path / "out" / task["responses"])
    assert len(answers) == 6 and {r["sample"] for r in answers} == {0, 1}
    assert task["generation"]["do_sample"] is True and task["generation"]["num_samples"] == 2
    # a random model writes no working function: every program runs and fails
    assert task["metrics"]["pass@1"]["value"] == 0 and task["metrics"]["pass@2"]["value"] == 0
    assert all(status == "failed" for r in answers for status in r["statuses"])


QUIET_EVALUATE = """
import json, sys
from safemerge import evaluate
model, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
evaluate(model, out, progress=False, **options)
"""


def test_the_api_with_progress_off_prints_nothing(files, tmp_path):
    options = {"safety": [f"file:{files['harmful']}"], "judge": f"keyword:{files['keywords']}", "max_new_tokens": 4,
               "tasks": [f"gsm8k:{files['gsm']}"], "cache_dir": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", QUIET_EVALUATE, str(files["model"]), str(tmp_path / "out"), json.dumps(options)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("", "")  # transformers' "Loading weights" bar included
    assert (tmp_path / "out" / "results.json").exists()
