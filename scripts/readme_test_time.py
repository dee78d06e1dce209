"""The README's figure for the test suite: how long the README's test command takes, and on what.

    python scripts/readme_test_time.py               # run `pytest`, print the figure, write it into README.md
    python scripts/readme_test_time.py --log FILE    # the same from a saved run's output (e.g. `.ci/run > FILE`)

The figure is pytest's own summary line (counts and seconds) with this machine's core count and CPU model.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from readme_blocks import replace_block

SUMMARY = re.compile(r"^=+ (?P<counts>.*?) in (?P<seconds>[\d.]+)s\b.*=+$", re.M)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def figure(output: str) -> str:
    summaries = list(SUMMARY.finditer(output))
    if not summaries:
        raise SystemExit("no pytest summary line ('=== N passed ... in S s ===') in the output")
    last = summaries[-1]
    seconds = float(last["seconds"])
    counts = re.sub(r"\s*,\s*", ", ", last["counts"])
    return (f"About {round(seconds / 60)} minutes on {os.cpu_count()} CPU cores: {counts} in {seconds:.0f} s "
            f"({cpu_model()}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="read a saved run's output instead of running pytest")
    args = parser.parse_args()
    if args.log:
        output = args.log.read_text()
    else:
        output = subprocess.run(["pytest"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    line = figure(output)
    print(line)
    replace_block("test-time", line)


if __name__ == "__main__":
    main()
