"""Merge into a live model: the trial models of a sweep, made without writing a checkpoint.

The merge stream is the very one `safemerge merge` runs (same readers, methods, chunking and
rounding to the output dtype); only its sink differs: chunks are copied into the model's
tensors instead of a file. So a trial evaluates exactly the model `safemerge merge` would write,
and its content fingerprint (hashed from the same chunks) is that file's fingerprint.
"""

from __future__ import annotations

import math

import torch
import xxhash
from torch import Tensor

from .checkpoints import combine_digests
from .config import MergeConfig
from .errors import IncompatibleModelsError
from .merge import stream
from .plan import plan_merge


class ParameterWriter:
    """A merge sink that fills a model's tensors in place, chunk by chunk in row-major order."""

    def __init__(self, model, plan):
        self.tensors = model.state_dict()  # shares storage with the parameters (tied ones included)
        self.plan = plan
        self.filled: dict[str, int] = {}
        self.hashes: dict[str, xxhash.xxh3_128] = {}
        for tp in plan.tensors:
            target = self.tensors.get(tp.name)
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
            self.hashes.setdefault(name, xxhash.xxh3_128()).update(flat.contiguous().view(-1).view(torch.uint8).numpy())

    def fingerprint(self) -> str:
        digests = {}
        for tp in self.plan.tensors:
            if self.filled.get(tp.name, 0) != math.prod(tp.shape):
                raise RuntimeError(f"tensor {tp.name} was not filled completely")
            digests[tp.name] = (tp.dtype, tp.shape, (self.hashes.get(tp.name) or xxhash.xxh3_128()).hexdigest())
        return "xxh3-128:" + combine_digests(digests)


def merge_into(model, cfg: MergeConfig) -> str:
    """Set ``model``'s weights to the merge ``cfg`` describes; returns its content fingerprint."""
    plan = plan_merge(cfg)
    try:
        writer = ParameterWriter(model, plan)
        stream(plan, writer)
        return writer.fingerprint()
    finally:
        plan.close()
