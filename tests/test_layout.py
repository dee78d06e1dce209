"""The package's layout rules hold: no import cycle (function-level imports included), no module over
450 lines, no function over 60 lines (scripts/check_layout.py, run on the real source tree)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_layout.py"


def test_the_layout_rules_hold():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path):
    """The rule is only worth something if a function-level import cycle is caught."""
    sys.path.insert(0, str(SCRIPT.parent))
    import check_layout

    a = tmp_path / "a.py"
    b = tmp_path / "b.py"
    a.write_text("from safemerge.b import g\n")
    b.write_text("def g():\n    from safemerge.a import f\n")
    modules = {"safemerge.a", "safemerge.b"}
    graph = {"safemerge.a": check_layout.imports(a, modules), "safemerge.b": check_layout.imports(b, modules)}
    assert check_layout.cycles(graph) == [["safemerge.a", "safemerge.b"]]
