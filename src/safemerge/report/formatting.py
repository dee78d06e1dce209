"""How numbers, λ and estimates are written in the report's tables."""

from __future__ import annotations

import statistics

from safemerge.report.reading import number

MISSING = "n/a"


NO_LAMBDA = "—"


CHOSEN_MARK = "✓"


FAILS_MARK = "†"


def format_lam(lam) -> str:
    lam = number(lam)
    return NO_LAMBDA if lam is None else f"{lam:g}"


def format_float(value, digits: int = 3) -> str:
    value = number(value)
    return MISSING if value is None else f"{value:.{digits}f}"


def format_mean_sd(values: list) -> str:
    """Over seeds: '0.612 ± 0.021' (sample sd), '0.612' for one value, 'n/a' for none; unmeasured seeds are said."""
    measured = [v for v in (number(v) for v in values) if v is not None]
    if not measured:
        return MISSING
    text = f"{measured[0]:.3f}" if len(measured) == 1 else \
        f"{statistics.mean(measured):.3f} ± {statistics.stdev(measured):.3f}"
    return text if len(measured) == len(values) else f"{text} ({len(measured)} of {len(values)} measured)"
