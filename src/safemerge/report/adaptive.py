"""The report's account of adaptive evaluation: the group-sequential design (looks, boundaries, how the
false-pass rate is spent across them) and where each merge's test stopped."""

from __future__ import annotations

from safemerge.report.formatting import format_float
from safemerge.report.reading import Run
from safemerge.report.render import Heading, Para, Table


def sequential_parts(run: Run) -> list[tuple[dict, str, dict]]:
    """(trial, safety set, its selection part) for every part judged look by look, in trial order."""
    return [(t, name, part["selection"]) for t in run.trials for name, part in t["safety"].items()
            if (part.get("selection") or {}).get("sequential")]


def adaptive_blocks(run: Run) -> list:
    parts = sequential_parts(run)
    if not parts:
        return []
    first = parts[0][2]["sequential"]
    blocks: list = [Heading("Adaptive evaluation"), Para(
        f"Each merge's safety selection prompts were judged in up to {len(first['looks'])} looks, in a seeded random "
        f"order (seed {first['order_seed']}), against the aligned model's verdicts on the same prompts. After each look "
        f"a group-sequential paired test at the margin {first['margin']:g} decides: pass (the rest of the selection "
        "is skipped; the report part and the tasks still run in full), fail (the trial stops: no report part, no "
        f"tasks), or continue. {first['spending']}")]
    designs = {tuple(p["sequential"]["looks"]): p["sequential"] for _, _, p in parts}
    for looks, seq in designs.items():
        rows = [[str(k + 1), str(n), _bound(None if c is None else -c, "≤"), _bound(b, "≥")]
                for k, (n, c, b) in enumerate(zip(looks, seq["efficacy"], seq["futility"]))]
        blocks += [Para(f"Boundaries for {looks[-1]} prompts (Tango's Z at the margin):"),
                   Table(["look", "prompts judged", "pass when Z", "fail when Z"], rows)]
    rows = [[t["label"], name, seq["decision"], f"{len(seq['steps'])} of {len(seq['looks'])}",
             f"{part['judged']} of {part['n']}", format_float(seq["steps"][-1]["statistic"])]
            for t, name, part in parts for seq in [part["sequential"]]]
    return blocks + [Para(f"{len(parts)} merge selection part(s) were judged look by look:"),
                     Table(["trial", "safety set", "decision", "look", "prompts judged", "Z"], rows)]


def _bound(value: float | None, relation: str) -> str:
    return "never" if value is None else f"{relation} {value:.3f}"
