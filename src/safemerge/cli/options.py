"""Options shared by several commands, defined once; their defaults come from the config models."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from safemerge.config import EvalConfig, SweepConfig
from safemerge.errors import ConfigError


def _default(model, name: str):
    field = model.model_fields[name]
    return field.default_factory() if field.default_factory else field.default


def eval_default(name: str):
    """The default of EvalConfig's field NAME: the one place it is defined."""
    return _default(EvalConfig, name)


def sweep_default(name: str):
    """The default of the sweep setting NAME (spelled flat, as the option): the one place it is defined."""
    return SweepConfig.flat_default(name)


Debug = Annotated[bool, typer.Option("--debug", help="show the full traceback of an error")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing --out (only once the new output is complete)")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="load .bin/.pt checkpoints with torch.load(weights_only=True)")]
QuietBar = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]
QuietAll = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no table")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda")]
Judge = Annotated[str, typer.Option(help="keyword[:FILE], compliance:FILE, wildguard[:MODEL], llamaguard[:MODEL]; auto: keyword on CPU, wildguard on GPU")]
Safety = Annotated[list[str] | None, typer.Option(help="safety set (repeatable): advbench[:PATH], hexphi:PATH, xstest[:PATH], file:PATH[:COLUMN]")]
SystemPrompt = Annotated[str, typer.Option(help="system prompt of every chat request ('' for none)")]
Thinking = Annotated[str, typer.Option(help="a thinking model's reasoning mode (Qwen3's enable_thinking): on or off; "
                                       "the judge reads the answer after </think>")]
MaxNewTokens = Annotated[int, typer.Option(help="longest response, in tokens")]
JudgePrefixTokens = Annotated[int | None, typer.Option(help="model judges (WildGuard, Llama Guard): generate and judge only "
                                                       "the first N tokens of each safety response")]
Adaptive = Annotated[bool, typer.Option("--adaptive/--exhaustive", help="adaptive: a safety response stops once its verdict is "
                                        "fixed, a trial once its safety verdict is, and a failing λ prunes the larger ones; "
                                        "exhaustive: every prompt of every trial in full")]
RepetitionPenalty = Annotated[float, typer.Option(help="repetition penalty of safety generations (the paper's 1.2)")]
TaskRepetitionPenalty = Annotated[float, typer.Option(help="repetition penalty of task generations")]
BatchSize = Annotated[int, typer.Option(help="prompts generated together")]
Limit = Annotated[int | None, typer.Option(help="only the first N prompts of each set (quick runs)")]
TensorParallel = Annotated[int, typer.Option(help="vllm: GPUs one model is split over")]
AllowCode = Annotated[bool, typer.Option("--allow-code-execution", help="run model-written code (HumanEval), sandboxed")]


def invoked_as() -> str:
    return shlex.join(["safemerge", *sys.argv[1:]])


def quiet_libraries() -> None:
    """transformers' own progress bars and advice would bury safemerge's one line per event."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_numbers(text: str, flag: str, kind: type = float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        example = "1,10" if kind is int else "0.2,0.4"
        raise ConfigError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'}, e.g. {example}; "
                          f"got {text!r}") from None


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sweep settings (aligned:, finetuned:, out:, ...)")
    return data  # relative paths in it are relative to the current directory, as on the command line
