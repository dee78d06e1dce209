"""Task-quality evaluation: built-in tasks, BERTScore, HumanEval in a sandbox, lm-evaluation-harness."""
