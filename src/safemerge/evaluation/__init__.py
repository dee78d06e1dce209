"""Evaluation: prompt sets, judges, statistics, tasks, and running a model over them."""
