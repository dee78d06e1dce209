"""Where trials run: in this process, one after the other, or on a Ray cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from safemerge.config import SweepConfig
from safemerge.sweeps.runner import TrialRunner
from safemerge.sweeps.store import TrialStore
from safemerge.sweeps.trials import Trial


class Executor(Protocol):
    """Runs trials (each a Trial and its key: self-contained, serialisable) and returns their
    records in order, reusing stored ones; ``on_done`` sees each record as it is ready."""

    reference: dict[str, str] | None  # the aligned model's selection verdicts: merges then run look by look

    def run(self, items: Iterable[tuple[Trial, str]], on_done: Callable[[dict], None]) -> list[dict]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs trials one after the other in this process; the runner is built at the first trial
    that is not already stored."""

    def __init__(self, cfg: SweepConfig, store: TrialStore, log: Callable[[str], None], status=lambda text: None):
        self.cfg, self.store, self.log, self.status = cfg, store, log, status
        self.runner: TrialRunner | None = None
        self.reference: dict[str, str] | None = None  # set once the aligned model is judged: adaptive merges

    def run(self, items: Iterable[tuple[Trial, str]], on_done: Callable[[dict], None] = lambda r: None) -> list[dict]:
        items = list(items)
        records: dict[str, dict] = {}
        for trial, key in items:
            record = self.store.get(key)
            if record is not None and key not in records:
                records[key] = record
                self.log(f"reused {key} {trial.label}")
                on_done(record)
        pending = list({key: (trial, key) for trial, key in items if key not in records}.values())
        if pending:
            self.runner = self.runner or TrialRunner(self.cfg, self.status)
            for trial, key in self.runner.prepare(pending, self.log, self.reference is not None):
                record, measured = self.runner.run(trial, self.reference)
                records[key] = record = {"key": key, **record}
                self.store.put(key, record, measured)
                self.log(f"evaluated {key} {trial.label} in {record['seconds']['total']:.1f}s")
                on_done(record)
        return [records[key] for _, key in items]

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None


def make_executor(cfg: SweepConfig, store: TrialStore, log, status) -> Executor:
    if cfg.executor == "ray":
        from safemerge.sweeps.ray import RayExecutor

        return RayExecutor(cfg, store, log, status, address=cfg.ray.address, num_workers=cfg.ray.num_workers,
                           gpus_per_trial=cfg.ray.gpus_per_trial, cpus_per_trial=cfg.ray.cpus_per_trial)
    return LocalExecutor(cfg, store, log, status)
