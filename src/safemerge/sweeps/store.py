"""Finished trials on disk, one atomic directory each, keyed by content."""

from __future__ import annotations

import json
from pathlib import Path

from safemerge.evaluation.run import Measured, write_outputs
from safemerge.sweeps.records import TrialRecord, checked


class TrialStore:
    """RUN/trials/<key>/: trial.json plus the trial's responses and judgements, each trial
    directory published atomically, so a kill never leaves half a trial behind."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: str) -> dict | None:
        path = self.root / key / "trial.json"
        return checked(TrialRecord, json.loads(path.read_text()), path) if path.exists() else None

    def put(self, key: str, record: dict, measured: Measured) -> None:
        from safemerge.checkpoints.writer import atomic_directory

        with atomic_directory(self.root / key, force=True) as tmp:
            write_outputs(tmp, checked(TrialRecord, record, self.root / key / "trial.json"), measured.records,
                          name="trial.json")
