"""What a merged model carries with it: model card, provenance record, and the progress bar."""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from safemerge.merging import methods


def version() -> str:
    try:
        return package_version("safemerge")
    except PackageNotFoundError:
        return "0+unknown"


def dump_json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"


def provenance(cfg, result, invoked_as: str | None = None) -> dict:
    """Every setting that produced the merge, as data (safemerge.json)."""
    return {
        "safemerge_version": version(),
        "method": cfg.method,
        "paper": methods.get(cfg.method).paper,
        "parameters": cfg.params,
        "lambda_meaning": "weight of the fine-tuned model: (1-λ)·aligned + λ·finetuned",
        "dtype": cfg.dtype,
        "keep_aligned": cfg.keep_aligned,
        "aligned": {"source": cfg.aligned, "fingerprint": result.fingerprints[cfg.aligned]},
        "finetuned": [{"source": f, "fingerprint": result.fingerprints[f]} for f in cfg.finetuned],
        "notes": result.notes,
        "command": command_line(cfg),
        "invoked_as": invoked_as,
    }


def model_card(cfg, result, invoked_as: str | None = None, note: str | None = None) -> str:
    m = methods.get(cfg.method)
    params = "\n".join(f"| {k} | {v} |" for k, v in cfg.params.items()) or "| (none) | |"
    inputs = "\n".join(
        [f"| aligned | `{cfg.aligned}` | `{result.fingerprints[cfg.aligned]}` |"]
        + [f"| fine-tuned {i + 1} | `{f}` | `{result.fingerprints[f]}` |" for i, f in enumerate(cfg.finetuned)]
    )
    notes = "".join(f"- {n}\n" for n in result.notes) or "- none\n"
    ran = f"\nThe command that was run:\n\n```bash\n{invoked_as}\n```\n" if invoked_as else ""
    chosen = f"\n## How it was chosen\n\n{note}\n" if note else ""
    return f"""---
base_model: {json.dumps(cfg.aligned)}
tags:
- merge
- safemerge
---

# Merged model

This model was made by [safemerge](https://pypi.org/project/safemerge/) {version()}: the
safety-aligned model below merged with its fine-tuned version(s), to bring back the safety
that fine-tuning erodes while keeping the task gain.

- Method: `{m.name}`: {m.summary} ([paper]({m.paper}))
- λ is the weight of the fine-tuned model: merged = (1 − λ)·aligned + λ·fine-tuned.
- Computed in float32 and rounded once to the output dtype (`{cfg.dtype}`).

| parameter | value |
|---|---|
{params}

## Inputs

| role | source | content fingerprint |
|---|---|---|
{inputs}

## Notes

{notes}
## Reproduce

```bash
{command_line(cfg)}
```
{ran}{chosen}"""


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """Yield ``advance(nbytes)``; draws a bytes/ETA bar on stderr when enabled and a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def command_line(cfg) -> str:
    """The `safemerge merge` command that reproduces this merge."""
    args = ["safemerge", "merge", cfg.aligned, *cfg.finetuned, "--out", str(cfg.out), "--method", cfg.method]
    params = cfg.params
    if "lam" in params:
        args += ["--lambda", str(params["lam"])]
    if "density" in params:
        args += ["--density", str(params["density"])]
    if "seed" in params:
        args += ["--seed", str(params["seed"])]
    args += ["--dtype", cfg.dtype, "--shard-size", str(cfg.shard_size)]
    for p in cfg.keep_aligned:
        args += ["--keep-aligned", p]
    if cfg.allow_pickle:
        args.append("--allow-pickle")
    return shlex.join(args)
