"""safemerge: merge a safety-aligned LLM with its fine-tuned version to restore safety.

λ (``lam``) is always the weight of the fine-tuned model: (1-λ)·aligned + λ·finetuned.

The data flows through the subpackages in this order: ``checkpoints`` (read and write weights),
``merging`` (methods, plan, streaming), ``backends`` (load and generate), ``evaluation`` (prompts,
judges, statistics, tasks), ``sweeps`` (trials, executors, the choice), ``report``; ``finetuning``
makes the fine-tuned model, ``cli`` and ``demo`` drive it all.
"""

from safemerge.errors import CheckpointError, ConfigError, IncompatibleModelsError, SafemergeError
from safemerge.evaluation.run import evaluate
from safemerge.finetuning.train import finetune
from safemerge.merging.methods import METHODS
from safemerge.merging.stream import MergeResult, merge
from safemerge.sweeps.run import sweep

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
