"""The sweep report, rendered from crafted results that follow the trial schema (/tmp/sm/sweep_schema.md)."""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import json
import re
import statistics
from pathlib import Path

import pytest

from safemerge.errors import ConfigError
from safemerge.evaluation.stats import bootstrap_mean, wilson
from safemerge.report.document import write_report
from safemerge.report.plots import pareto_front
from safemerge.report.tables import paper_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAMBDAS = (0.2, 0.5, 0.8)
SEEDS = (0, 1)


def est(successes: int, n: int) -> dict:
    return wilson(successes, n).to_dict()


def trial(kind: str, method: str, lam, seed, *, density=None, asr: int = 10, over: int = 12, acc: int = 50,
          label: str | None = None) -> dict:
    """One trial record; asr/over/acc are counts out of 100 prompts / 125 safe prompts / 100 items."""
    text = f"{kind} {method} {lam} {density} {seed}"
    key = hashlib.sha1(text.encode()).hexdigest()
    val, test = est(acc, 100), est(acc - 3, 100)
    head = {"sha256": "0" * 64, "n": 100, "cache_hits": 0}
    part = {**head, "asr": est(asr, 100), "parse_errors": 0, "miss_rate": 0.0, "refusal_rate": est(100 - asr, 100),
            "judge": "keyword", "verdicts": "1" * asr + "0" * (100 - asr)}
    xs = {**head, "n": 225, "over_refusal": est(over, 125), "unsafe_compliance": est(asr // 2, 100), "n_safe": 125,
          "n_unsafe": 100, "parse_errors": 0, "judge": "keyword"}
    return {
        "key": key, "kind": kind, "method": method, "lam": lam, "density": density, "seed": seed,
        "finetuned": [f"./seed{s}" for s in (SEEDS if seed is None else (seed,))],
        "label": label or f"{method} λ={lam} (seed {seed})", "fingerprint": f"xxh3-128:{key[:32]}",
        "generated_by": "transformers cpu/float32",
        "safety": {"advbench": {"selection": part, "report": {**part, "asr": est(asr + 1, 100)}},
                   "xstest": {"selection": xs, "report": {**xs, "over_refusal": est(over + 2, 125)}}},
        "tasks": {"val": {"gsm8k": {"primary": "accuracy", "metrics": {"accuracy": val}, "n": 100}},
                  "test": {"gsm8k": {"primary": "accuracy", "metrics": {"accuracy": test}, "n": 100}}},
        "val_score": val["value"], "test_score": test["value"],
        "seconds": {"merge": 0.1, "generate": 3.0, "judge": 0.2, "score": 0.1, "total": 3.4 + lam_or_zero(lam)},
    }


def lam_or_zero(lam) -> float:
    return 0.0 if lam is None else lam


def group(trials: list[dict], qualifies: bool, why_not: str | None = None) -> dict:
    first = trials[0]
    vals = [t["val_score"] for t in trials]
    return {"method": first["method"], "lam": first["lam"], "density": first["density"],
            "label": f"{first['method']} λ={first['lam']}", "n_seeds": len(trials),
            "trials": [t["key"] for t in trials],
            "val_score": {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0},
            "test_score": {"mean": 0.0, "sd": 0.0}, "asr_selection": {}, "qualifies": qualifies, "why_not": why_not}


def crafted_results() -> dict:
    """Aligned, 2 fine-tuned seeds, linear and ties × 3 λ × 2 seeds, model_stock; linear at λ 0.5 is chosen."""
    aligned = trial("aligned", "linear", 0.0, None, asr=2, over=10, acc=30, label="aligned")
    finetuned = [trial("finetuned", "linear", 1.0, s, asr=40 + 7 * s, over=5 + s, acc=60 + 4 * s,
                       label=f"fine-tuned (seed {s})") for s in SEEDS]
    merges = {m: {lam: [trial("merge", m, lam, s, density=0.5 if m == "ties" else None,
                              asr=int(2 + 40 * lam) + 3 * s + (5 if m == "ties" else 0),
                              over=8 + int(10 * lam) + s, acc=int(35 + 30 * lam) + 2 * s + (1 if m == "ties" else 0))
                        for s in SEEDS] for lam in LAMBDAS} for m in ("linear", "ties")}
    stock = trial("merge", "model_stock", None, None, asr=9, over=9, acc=52, label="model_stock (all seeds)")
    groups = [group(merges["linear"][lam], qualifies=lam <= 0.5, why_not=None if lam <= 0.5 else "ASR too high")
              for lam in LAMBDAS]
    groups += [group(merges["ties"][lam], qualifies=False, why_not="ASR upper bound above the aligned model's + 0.02")
               for lam in LAMBDAS]
    groups.append(group([stock], qualifies=True))
    chosen = merges["linear"][0.5][1]
    trials = [aligned, *finetuned] + [t for m in merges.values() for lam in LAMBDAS for t in m[lam]] + [stock]
    choice = {
        "policy": "constrained", "max_asr_increase": 0.02, "confidence": 0.95,
        "test": "A merge passes when its paired upper bound is at most 0.02.", "aligned": aligned["key"],
        "chosen": {"kind": "merge", "method": "linear", "lam": 0.5, "density": None, "seed": 1,
                   "trial": chosen["key"], "label": chosen["label"]},
        "reason": "linear λ=0.5 has the best validation score among merges within 0.02 of the aligned model's ASR.",
        "groups": groups,
        "best_per_method": {
            "linear": {"lam": 0.5, "density": None, "trial": merges["linear"][0.5][0]["key"], "qualifies": True,
                       "label": "linear λ=0.5"},
            "ties": {"lam": 0.8, "density": 0.5, "trial": merges["ties"][0.8][0]["key"], "qualifies": False,
                     "label": "ties λ=0.8 density=0.5"},
            "model_stock": {"lam": None, "density": None, "trial": stock["key"], "qualifies": True,
                            "label": "model_stock"},
        },
    }
    return {
        "safemerge_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00",
        "command": "safemerge sweep --aligned ./aligned --finetuned ./seed0 ./seed1 --out RUN",
        "config": {"aligned": "./aligned", "finetuned": ["./seed0", "./seed1"],
                   "methods": ["linear", "ties", "model_stock"], "lambdas": list(LAMBDAS), "search": "grid",
                   "policy": "constrained", "max_asr_increase": 0.02, "safety": ["advbench", "xstest"],
                   "judge": "keyword", "task_val": "gsm8k:val", "task_test": "gsm8k:test",
                   "generation": {"max_new_tokens": 64, "temperature": 0.0}},
        "trials": trials, "search_log": [], "monotonicity_breaches": [], "choice": choice,
        "reproduce": "safemerge merge --aligned ./aligned --finetuned ./seed1 --method linear --lambda 0.5 --out m",
        "merged": "merged",
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[dict, dict[str, Path]]:
    results = crafted_results()
    return results, write_report(tmp_path_factory.mktemp("run"), results)


def md_table_rows(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells, split on the pipes that are not escaped."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


def expected(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def test_files_exist_and_are_returned(written):
    _results, paths = written
    assert set(paths) == {"report.md", "report.html", "plots/tradeoff.png", "plots/lambda_linear.png",
                          "plots/lambda_ties.png"}  # model_stock has no λ: drawn as a band, no picture of its own
    for name, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes().startswith(PNG_SIGNATURE)
    run_dir = paths["report.md"].parent
    assert sorted(p.name for p in run_dir.rglob(".*")) == []  # no temporary file left behind


def test_html_is_self_contained_and_embeds_every_plot(written):
    _, paths = written
    page = paths["report.html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page)
    assert not re.search(r"<link\b", page) and "<script" not in page
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pictures = sorted(p.read_bytes() for n, p in paths.items() if n.endswith(".png"))
    assert sorted(base64.b64decode(e) for e in embedded) == pictures
    assert '<a href="merged/">' in page
    md = paths["report.md"].read_text()
    for name in ("tradeoff", "lambda_linear", "lambda_ties"):
        assert f"(plots/{name}.png)" in md
    assert "[merged](merged/)" in md


def test_every_trial_label_and_the_settings_appear(written):
    results, paths = written
    md, page = paths["report.md"].read_text(), paths["report.html"].read_text()
    for t in results["trials"]:
        assert t["label"] in md and html.escape(t["label"]) in page
        assert t["key"][:8] in md
    for text in (results["reproduce"], results["choice"]["reason"], "judge: \"keyword\"", "max_new_tokens"):
        assert text in md and html.escape(text) in page
    assert "Search log" not in md and "Monotonicity breaches" not in md  # absent when there is nothing to say


def test_paper_table_numbers_are_mean_and_sd_over_seeds(written):
    results, _ = written
    header, rows = paper_table(results)
    assert header[:4] == ["chosen", "model", "λ", "seeds"]
    assert header[4:] == ["gsm8k accuracy (test)", "ASR advbench", "over-refusal xstest"]
    by_model = {r[1]: r for r in rows}
    assert list(by_model) == ["aligned", "fine-tuned", "linear", "ties (density 0.5) †", "model_stock"]
    trials = results["trials"]

    def column(selected: list[dict]) -> list[str]:
        return [expected([t["tasks"]["test"]["gsm8k"]["metrics"]["accuracy"]["value"] for t in selected]),
                expected([t["safety"]["advbench"]["report"]["asr"]["value"] for t in selected]),
                expected([t["safety"]["xstest"]["report"]["over_refusal"]["value"] for t in selected])]

    finetuned = [t for t in trials if t["kind"] == "finetuned"]
    linear = [t for t in trials if t["method"] == "linear" and t["kind"] == "merge" and t["lam"] == 0.5]
    ties = [t for t in trials if t["method"] == "ties" and t["lam"] == 0.8]
    assert by_model["aligned"][2:] == ["0", "1"] + column([trials[0]])
    assert by_model["fine-tuned"][2:] == ["1", "2"] + column(finetuned)
    assert by_model["linear"][2:] == ["0.5", "2"] + column(linear)
    assert by_model["ties (density 0.5) †"][2:] == ["0.8", "2"] + column(ties)
    assert by_model["model_stock"][2:] == ["—", "1"] + column([trials[-1]])
    assert " ± " in by_model["linear"][4] and " ± " not in by_model["aligned"][4]
    assert [r[0] for r in rows] == ["", "", "✓", "", ""]  # the chosen merge, and only it


def test_chosen_row_is_highlighted_and_markdown_tables_are_well_formed(written):
    _, paths = written
    page = paths["report.html"].read_text()
    chosen_rows = re.findall(r'<tr class="chosen">(.*?)</tr>', page)
    assert len(chosen_rows) == 2  # the paper table's row and the chosen trial in the list of trials
    assert "<td>linear</td>" in chosen_rows[0] and "<td>linear λ=0.5 (seed 1)</td>" in chosen_rows[1]
    md = paths["report.md"].read_text()
    tables = md_table_rows(md)
    assert len(tables) == 2
    for table in tables:
        assert len({len(row) for row in table}) == 1, table
        assert all(set(cell) <= set("-") for cell in table[1])  # the separator row
    assert any(row[0] == "**✓**" and row[1] == "**linear**" for row in tables[0])
    assert "ASR too high" not in md and "ASR upper bound above the aligned model's + 0.02" in md  # the † note


def test_search_log_and_breaches_are_shown(tmp_path):
    results = crafted_results()
    keys = [t["key"] for t in results["trials"] if t["method"] == "linear" and t["seed"] == 0 and t["kind"] == "merge"]
    results["search_log"] = [{"phase": "bisect", "method": "linear", "seed": 0, "lam": lam, "meets": lam < 0.6,
                              "asr": {"advbench": est(int(40 * lam), 100)}, "trial": key,
                              "asr_upper": {"advbench": 0.05 + lam / 10}}
                             for lam, key in zip((0.5, 0.8, 0.2), keys)]
    breach = "linear seed 0: ASR upper bound at λ=0.75 (0.10) is below that at λ=0.5 (0.20)"
    results["monotonicity_breaches"] = [breach]
    paths = write_report(tmp_path, results)
    md, page = paths["report.md"].read_text(), paths["report.html"].read_text()
    assert "## Search log" in md and "## Monotonicity breaches" in md and "Warning: 1 breach" in md
    assert breach in md and html.escape(breach) in page
    search = md_table_rows(md)[2]  # after the paper table and the trials
    assert search[2] == ["bisect", "linear", "0", "0.5", "yes", "advbench: 0.100", keys[0][:8]]
    assert search[3][4] == "no" and len(md_table_rows(md)) == 3


def test_output_is_byte_identical_across_calls_and_directories(written, tmp_path):
    results, first = written
    again = write_report(tmp_path, copy.deepcopy(results))
    again_same_dir = write_report(first["report.md"].parent, copy.deepcopy(results))
    for name, path in first.items():
        assert again[name].read_bytes() == path.read_bytes(), name
        assert again_same_dir[name].read_bytes() == path.read_bytes(), name


def test_single_seed_missing_values_and_aligned_choice(tmp_path):
    """One fine-tuned seed, an unmeasured ASR, no test task, and no merge that qualifies."""
    results = crafted_results()
    results["trials"] = [t for t in results["trials"] if t["seed"] in (0, None)]
    kept = {t["key"] for t in results["trials"]}
    for g in results["choice"]["groups"]:
        g["trials"] = [k for k in g["trials"] if k in kept]
    for t in results["trials"]:
        t["tasks"]["test"] = {}
        t["test_score"] = None
    stock = results["trials"][-1]
    stock["safety"]["advbench"]["report"]["asr"] = {"value": None, "low": 0.0, "high": 1.0, "n": 0,
                                                    "interval": "wilson"}
    stock["tasks"]["val"]["gsm8k"]["metrics"]["accuracy"] = bootstrap_mean([0.5, 0.75, 1.0]).to_dict()
    results["choice"]["chosen"] = {"kind": "aligned", "method": "linear", "lam": 0.0, "density": None, "seed": None,
                                   "trial": results["choice"]["aligned"], "label": "aligned"}
    results["choice"]["reason"] = "No merge meets the constraint, so the aligned model is kept."
    results["reproduce"], results["merged"] = None, None
    header, rows = paper_table(results)
    assert header[4] == "gsm8k accuracy (val)"
    by_model = {r[1]: r for r in rows}
    assert by_model["aligned"][0] == "✓" and [r[0] for r in rows].count("✓") == 1
    finetuned = results["trials"][1]
    assert by_model["fine-tuned"][4] == f"{finetuned['tasks']['val']['gsm8k']['metrics']['accuracy']['value']:.3f}"
    assert by_model["model_stock"][4:6] == ["0.750", "n/a"]
    paths = write_report(tmp_path, results)
    md = paths["report.md"].read_text()
    assert "nothing to write" in md and "merged/" not in md
    assert "1 trial(s) lack a task score or an ASR" in md
    assert all(len({len(r) for r in table}) == 1 for table in md_table_rows(md))


def test_pipes_and_markup_in_text_are_escaped(tmp_path):
    results = crafted_results()
    results["trials"][0]["label"] = "aligned | <b>base</b>"
    results["choice"]["reason"] = "kept <script>alert(1)</script> | because"
    paths = write_report(tmp_path, results)
    page, md = paths["report.html"].read_text(), paths["report.md"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;base&lt;/b&gt;" in page
    assert r"aligned \| \<b\>base\</b\>" in md
    assert all(len({len(r) for r in table}) == 1 for table in md_table_rows(md))


def test_pareto_front_matches_brute_force():
    points = [(0.5, 0.10), (0.6, 0.10), (0.6, 0.20), (0.7, 0.30), (0.4, 0.05), (0.7, 0.30), (0.65, 0.50),
              (0.3, 0.05), (0.9, 0.90)]

    def dominated(i: int) -> bool:
        (s, a) = points[i]
        return any(t >= s and b <= a and (t > s or b < a) for t, b in points)

    assert pareto_front(points) == [i for i in range(len(points)) if not dominated(i)]
    assert pareto_front([]) == []


def test_malformed_results_raise_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="results.json: safemerge_version: Field required"):
        write_report(tmp_path, {"trials": []})
    with pytest.raises(ConfigError, match="results: the record: Input should be a valid dictionary"):
        paper_table([])  # type: ignore[arg-type]
    edited = crafted_results()
    edited["trials"][3]["safety"]["advbench"]["report"]["asr"]["value"] = "low"
    with pytest.raises(ConfigError, match=r"trials\.3\.safety\.advbench\.report\.asr\.value: Input should be a valid number"):
        write_report(tmp_path, edited)
    edited = crafted_results()
    edited["choice"]["chosen"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"choice\.chosen\.colour: Extra inputs are not permitted"):
        write_report(tmp_path, edited)
    json.dumps(crafted_results(), allow_nan=False)  # the crafted results are strict JSON, as the sweep writes them


def test_a_stored_trial_reads_back_as_written_and_an_edited_one_is_one_line(tmp_path):
    from safemerge.evaluation.run import Measured
    from safemerge.sweeps.store import TrialStore

    record = crafted_results()["trials"][3]
    store = TrialStore(tmp_path / "trials")
    store.put(record["key"], record, Measured(records={"judgements/x.jsonl": [{"id": "1"}]}))
    assert store.get(record["key"]) == record
    path = tmp_path / "trials" / record["key"] / "trial.json"
    assert json.loads(path.read_text()) == record
    edited = json.loads(path.read_text())
    edited["tasks"]["val"]["gsm8k"]["n"] = "many"
    path.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=rf"{record['key']}/trial.json: tasks\.val\.gsm8k\.n: Input should be a valid integer"):
        store.get(record["key"])
    with pytest.raises(ConfigError, match="kind: Input should be 'aligned', 'finetuned' or 'merge'"):
        store.put("k", {**record, "kind": "mystery"}, Measured())
    assert not (tmp_path / "trials" / "k").exists()  # nothing half-written
