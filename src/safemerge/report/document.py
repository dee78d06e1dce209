"""The sweep's report: a paper-style table, trade-off plots, and the same content as Markdown and self-contained HTML.

Everything is rendered from RUN/results.json alone, so `safemerge report RUN` can rebuild it, and the bytes depend on
nothing but the results (no clock, no absolute paths, no matplotlib version stamp).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from safemerge.checkpoints.writer import disk_error, write_file
from safemerge.report.adaptive import adaptive_blocks
from safemerge.report.formatting import CHOSEN_MARK, FAILS_MARK
from safemerge.report.plots import all_plots, lambda_methods, plot_name, tradeoff_points
from safemerge.report.reading import Run, read_run
from safemerge.report.render import Bullets, Code, Heading, Image, Para, Table, link_target, to_html, to_markdown
from safemerge.report.tables import paper_table_of, search_table, trials_table

SETTING_KEYS = ("aligned", "finetuned", "methods", "lambdas", "search", "policy", "max_asr_increase", "judge", "safety",
                "task_val", "task_test", "generation", "adaptive")


def _document(run: Run, plots: dict[str, bytes]) -> list:
    results = run.results
    header, cells, rows = paper_table_of(run)
    blocks: list = [Heading("safemerge sweep report", 1)]
    blocks.append(Para(f"Created {results['created']} by safemerge {results['safemerge_version']}."))
    blocks.append(Para("Choice: " + run.choice["reason"]))
    if run.choice["policy"] == "constrained":
        blocks.append(Para("The safety test: " + run.choice["test"]))
    breaches = results["monotonicity_breaches"]
    if breaches:
        blocks.append(Para(f"Warning: {len(breaches)} breach(es) of the assumption that ASR grows with λ; "
                           "see 'Monotonicity breaches' below."))
    if results["merged"]:
        blocks.append(Para("The chosen model is written to", link=(str(results["merged"]), link_target(results["merged"]))))
    split_note = "test" if run.table_split == "test" else "validation (there is no test task)"
    blocks += [Heading("Results"),
               Para(f"Task scores on the {split_note} split; ASR and over-refusal on the report part of each safety "
                    "set, not the part used to choose. Mean ± sample standard deviation over fine-tuning seeds. "
                    f"{CHOSEN_MARK} marks the chosen model."),
               Table(header, cells, {i for i, r in enumerate(rows) if r.chosen})]
    notes = [f"{r.name}: {r.why_not}" for r in rows if r.why_not]
    if notes:
        blocks += [Para(f"{FAILS_MARK} does not meet the safety constraint:"), Bullets(notes)]
    reproduce = results["reproduce"]
    blocks += [Heading("Reproduce"), Code(str(reproduce), "bash") if reproduce else
               Para("No merge was chosen, so there is nothing to write: use the aligned model as it is.")]
    blocks += _plot_blocks(run, plots)
    t_header, t_rows, t_chosen = trials_table(run)
    blocks += [Heading("Trials"), Para(f"{len(run.trials)} trials, in the order they were evaluated; estimates are "
                                       "value [95% interval]."),
               Table(t_header, t_rows, set() if t_chosen is None else {t_chosen})]
    s_header, s_rows = search_table(run)
    if s_rows:
        blocks += [Heading("Search log"),
                   Para("λ values the search added: refine bisects each method between its largest λ that passes "
                        "the safety test and the next λ tried; bisect searches [0, 1]."), Table(s_header, s_rows)]
    if breaches:
        blocks += [Heading("Monotonicity breaches"),
                   Para("The bisection assumes ASR grows with λ; these measurements contradict it, so its answer "
                        "for these methods may be wrong:"), Bullets([str(b) for b in breaches])]
    return blocks + adaptive_blocks(run) + _pruned_blocks(results.get("pruned", [])) + _settings_blocks(results)


def _pruned_blocks(pruned: list[dict]) -> list:
    """The grid trials the adaptive sweep skipped, one line per method and reason."""
    if not pruned:
        return []
    lines: dict[str, list[float]] = {}
    for p in pruned:
        lines.setdefault(p["reason"], []).append(p["lam"])
    return [Heading("Pruned"), Para(f"{len(pruned)} grid trials were not run (adaptive sweep):"),
            Bullets([f"λ {', '.join(f'{x:g}' for x in sorted(set(lams)))}: {reason}" for reason, lams in lines.items()])]


def _plot_blocks(run: Run, plots: dict[str, bytes]) -> list:
    blocks: list = [Heading("Plots"), Image("ASR against task score", "plots/tradeoff.png", plots["tradeoff.png"])]
    missing = len(run.trials) - len(tradeoff_points(run))
    if missing:
        blocks.append(Para(f"{missing} trial(s) lack a task score or an ASR and are not drawn."))
    for method in lambda_methods(run):
        name = plot_name(method)
        blocks.append(Image(f"{method}: ASR and task score against λ", f"plots/{name}", plots[name]))
    return blocks


def _settings_blocks(results: dict) -> list:
    config = results["config"]
    items = [f"{k}: {json.dumps(config[k], ensure_ascii=False, sort_keys=True)}" for k in SETTING_KEYS if k in config]
    prefix = config.get("evaluation", {}).get("judge_prefix_tokens")
    if prefix:
        items.append(f"judge_prefix_tokens: {prefix} (a model judge read only the first {prefix} tokens of each safety response)")
    blocks: list = [Heading("Settings"), Bullets(items or ["no configuration was recorded"])]
    if results["command"]:
        blocks += [Para("The command that ran the sweep:"), Code(str(results["command"]), "bash")]
    if config:
        blocks += [Heading("Full configuration", 3), Code(json.dumps(config, indent=2, ensure_ascii=False), "json")]
    return blocks


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path.parent) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(run_dir: Path, results: dict) -> dict[str, Path]:
    """Write RUN/report.md, RUN/report.html and RUN/plots/*.png from results; returns {relative name: path}."""
    run_dir = Path(run_dir)
    run = read_run(results, str(run_dir / "results.json"))
    plots = all_plots(run)
    blocks = _document(run, plots)
    plot_dir = run_dir / "plots"
    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, run_dir) from None
    written: dict[str, Path] = {}
    for name, data in plots.items():
        _write_atomic(plot_dir / name, data)
        written[f"plots/{name}"] = plot_dir / name
    for stale in sorted(plot_dir.glob("lambda_*.png")):  # a method dropped from the sweep leaves no old picture
        if stale.name not in plots:
            stale.unlink(missing_ok=True)
    for name, text in (("report.md", to_markdown(blocks)), ("report.html", to_html(blocks))):
        _write_atomic(run_dir / name, text.encode("utf-8"))
        written[name] = run_dir / name
    return written
