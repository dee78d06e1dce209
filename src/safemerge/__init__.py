"""safemerge: merge a safety-aligned LLM with its fine-tuned version to restore safety.

λ (``lam``) is always the weight of the fine-tuned model: (1-λ)·aligned + λ·finetuned.

The data flows through the subpackages in this order: ``checkpoints`` (read and write weights),
``merging`` (methods, plan, streaming), ``backends`` (load and generate), ``evaluation`` (prompts,
judges, statistics, tasks), ``sweeps`` (trials, executors, the choice), ``report``; ``finetuning``
makes the fine-tuned model, ``cli`` and ``demo`` drive it all.
"""

from safemerge.errors import CheckpointError, ConfigError, IncompatibleModelsError, SafemergeError
from safemerge.merging.methods import METHODS
from safemerge.merging.stream import MergeResult, merge

# imported when first used: `safemerge merge` should not pay for the evaluation, sweep and training stacks
_LAZY = {"evaluate": "safemerge.evaluation.run", "sweep": "safemerge.sweeps.run", "finetune": "safemerge.finetuning.train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safemerge' has no attribute {name!r}")

__all__ = [
    "METHODS",
    "CheckpointError",
    "ConfigError",
    "IncompatibleModelsError",
    "MergeResult",
    "SafemergeError",
    "evaluate",
    "finetune",
    "merge",
    "sweep",
]
