"""Merge into a live model: the trial models of a sweep, made without writing a checkpoint.

The merge stream is the very one `safemerge merge` runs (same readers, methods, chunking and
rounding to the output dtype); only its sink differs: chunks are copied into the model's
tensors instead of a file. So a trial evaluates exactly the model `safemerge merge` would write,
and its content fingerprint (hashed from the same chunks) is that file's fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import xxhash
from torch import Tensor

from safemerge.checkpoints.files import combine_digests
from safemerge.config import MergeConfig
from safemerge.errors import IncompatibleModelsError
from safemerge.merging.plan import MergePlan, TensorPlan, plan_merge
from safemerge.merging.stream import stream

Digest = tuple[torch.dtype, tuple[int, ...], str]


class ParameterWriter:
    """A merge sink that fills a model's tensors in place, chunk by chunk in row-major order,
    hashing each tensor's chunks as the file writer's bytes would be hashed."""

    def __init__(self, tensors: dict[str, Tensor], plan: MergePlan):
        self.tensors = tensors
        self.filled: dict[str, int] = {}
        self.hashes: dict[str, xxhash.xxh3_128] = {}
        for tp in plan.tensors:
            target = tensors.get(tp.name)
            if target is None:
                raise IncompatibleModelsError(f"the merge makes tensor {tp.name}, which the loaded model does not have")
            if tuple(target.shape) != tuple(tp.shape):
                raise IncompatibleModelsError(
                    f"tensor {tp.name}: the merge makes shape {tuple(tp.shape)} but the live model has {tuple(target.shape)}"
                    " (a fine-tune with added vocabulary); evaluate the written merge with `safemerge evaluate` instead")

    def write(self, name: str, chunk: Tensor) -> None:
        start = self.filled.get(name, 0)
        flat = chunk.reshape(-1)
        self.tensors[name].view(-1)[start:start + flat.numel()].copy_(flat)
        self.filled[name] = start + flat.numel()
        if flat.numel():
            self.hashes.setdefault(name, xxhash.xxh3_128()).update(flat.contiguous().view(torch.uint8).numpy())

    def digest(self, tp: TensorPlan) -> Digest:
        if self.filled.get(tp.name, 0) != math.prod(tp.shape):
            raise RuntimeError(f"tensor {tp.name} was not filled completely")
        return tp.dtype, tp.shape, (self.hashes.get(tp.name) or xxhash.xxh3_128()).hexdigest()


class LiveMerger:
    """A model whose weights successive merges overwrite in place. After the first merge, a
    tensor that neither this merge nor the previous ones changed (all but a LoRA adapter's
    target modules, say) already holds the aligned values and is not read or written again:
    for a LoRA fine-tune a trial then costs only the adapter's modules."""

    def __init__(self, model):
        self.tensors = model.state_dict()  # shares storage with the parameters (tied ones included)
        self.static: dict[str, Digest] | None = None  # digests of the aligned copies, from the first full pass
        self.dirty: set[str] = set()  # tensors a merge changed since the first pass

    def merge(self, cfg: MergeConfig) -> str:
        """Set the model's weights to the merge ``cfg`` describes; returns its content fingerprint."""
        plan = plan_merge(cfg)
        try:
            first = self.static is None
            todo = plan.tensors if first else [t for t in plan.tensors if t.merge or t.name in self.dirty]
            writer = ParameterWriter(self.tensors, plan)
            stream(replace(plan, tensors=todo), writer)
            digests = dict(self.static or {}) | {t.name: writer.digest(t) for t in todo}
            if first:
                self.static = {t.name: digests[t.name] for t in plan.tensors if not t.merge}
            self.dirty = {t.name for t in plan.tensors if t.merge}
            return "xxh3-128:" + combine_digests({t.name: digests[t.name] for t in plan.tensors})
        finally:
            plan.close()


def merge_into(model, cfg: MergeConfig) -> str:
    """One merge into ``model`` (a full pass over every tensor); returns its content fingerprint."""
    return LiveMerger(model).merge(cfg)
