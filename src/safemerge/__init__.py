"""safemerge: merge a safety-aligned LLM with its fine-tuned version to restore safety.

λ (``lam``) is always the weight of the fine-tuned model: (1-λ)·aligned + λ·finetuned.
"""

from .errors import CheckpointError, ConfigError, IncompatibleModelsError, SafemergeError
from .merge import MergeResult, merge
from .methods import METHODS

__all__ = [
    "METHODS",
    "CheckpointError",
    "ConfigError",
    "IncompatibleModelsError",
    "MergeResult",
    "SafemergeError",
    "merge",
]
