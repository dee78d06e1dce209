"""Plan a merge: open every input (headers only) and check it against the others, before
any tensor is read. The plan says, per output tensor, its shape, dtype and whether it is
merged or copied; the config, tokenizer and notes the output will carry.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safemerge.checkpoints.lora import LoraAdapter
from safemerge.checkpoints.readers import Checkpoint, open_source, tokenizer_files
from safemerge.config import MergeConfig
from safemerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from safemerge.merging import methods

ARCHITECTURE_KEYS = (
    "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim",
)

Source = Checkpoint | LoraAdapter


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # of the output
    dtype: torch.dtype  # of the output
    merge: bool  # False: copied from the aligned model (kept, non-float, or changed by no input)
    shared_rows: int  # rows the aligned model has; more output rows come from the fine-tuned models


@dataclass
class MergePlan:
    config: MergeConfig
    aligned: Checkpoint
    tuned: list[Source]
    tensors: list[TensorPlan]
    model_config: dict  # config.json of the output
    tokenizer: list[Path]  # tokenizer files to copy
    notes: list[str] = field(default_factory=list)  # interpretations worth recording in the card

    @property
    def method(self) -> methods.Method:
        return methods.get(self.config.method)

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in self.tensors)

    def close(self) -> None:
        for s in (self.aligned, *self.tuned):
            s.files.close()


def vocab_size(config: dict) -> int | None:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def check_outside_inputs(out: Path, inputs: list[Source]) -> None:
    out = Path(os.path.realpath(out))
    for src in inputs:
        p = Path(os.path.realpath(src.path))
        if out == p or p in out.parents:
            raise ConfigError(f"--out {out} is inside the input {src.spec}; choose a directory outside every input")
        if out in p.parents:
            raise ConfigError(f"--out {out} contains the input {src.spec}; choose another --out")


def check_architecture(aligned: Checkpoint, tuned: Checkpoint) -> None:
    for key in ARCHITECTURE_KEYS:
        a, t = aligned.config.get(key), tuned.config.get(key)
        if a is not None and t is not None and a != t:
            raise IncompatibleModelsError(
                f"{tuned.spec} is not a fine-tune of {aligned.spec}: {key} is {t} there and {a} in the aligned model"
            )


def some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def tuned_shapes(aligned: Checkpoint, t: Source) -> dict[str, tuple[int, ...]]:
    """Shape of each aligned tensor in the fine-tuned model ``t``; checks names and LoRA targets."""
    names = set(aligned.infos)
    if isinstance(t, Checkpoint):
        missing, extra = names - set(t.infos), set(t.infos) - names
        if missing:
            raise IncompatibleModelsError(f"{t.spec} lacks {len(missing)} tensor(s) of the aligned model: {some(missing)}; are both the same architecture?")
        if extra:
            raise IncompatibleModelsError(f"{t.spec} has {len(extra)} tensor(s) the aligned model lacks: {some(extra)}; are both the same architecture?")
        return {n: t.infos[n].shape for n in names}
    shapes = {n: aligned.infos[n].shape for n in names}
    absent = [n for n in (*t.modules, *t.full) if n not in names]
    if absent:
        raise IncompatibleModelsError(
            f"adapter {t.spec} targets {some(absent)}, absent from the aligned model {aligned.spec}; was it trained on another base model?"
        )
    for name, key in t.full.items():
        shapes[name] = t.files.infos[key].shape
    for name, m in t.modules.items():
        a_shape, b_shape = t.files.infos[m.a_key].shape, t.files.infos[m.b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
            raise IncompatibleModelsError(
                f"adapter {t.spec}: lora_A {list(a_shape)} and lora_B {list(b_shape)} of {name} do not fit together; the adapter is corrupt"
            )
        delta = (a_shape[1], b_shape[0]) if m.transposed else (b_shape[0], a_shape[1])
        if delta != tuple(shapes[name]):
            raise IncompatibleModelsError(
                f"adapter {t.spec}: LoRA for {name} gives a delta of shape {list(delta)} but the tensor has shape "
                f"{list(shapes[name])}; was it trained on another base model?"
            )
    return shapes


def plan_merge(cfg: MergeConfig) -> MergePlan:
    """Open every input (headers only) and check that they can be merged as asked."""
    aligned = open_source(cfg.aligned, allow_pickle=cfg.allow_pickle)
    if not isinstance(aligned, Checkpoint):
        raise ConfigError(f"ALIGNED {cfg.aligned} is a LoRA adapter; give the aligned model's directory, and the adapter as FINETUNED")
    tuned = [open_source(s, allow_pickle=cfg.allow_pickle) for s in cfg.finetuned]
    check_outside_inputs(cfg.out, [aligned, *tuned])
    for t in tuned:
        if isinstance(t, Checkpoint):
            check_architecture(aligned, t)

    va = vocab_size(aligned.config)
    shapes = [tuned_shapes(aligned, t) for t in tuned]
    keep = [re.compile(p) for p in cfg.keep_aligned]
    unused = [p.pattern for p in keep if not any(p.search(n) for n in aligned.infos)]
    if unused:
        raise ConfigError(f"--keep-aligned {some(unused)} matches no tensor of {cfg.aligned}")
    grown_to: set[int] = set()
    plans = []
    for name, info in aligned.infos.items():
        rows = out_rows(name, info.shape, [s[name] for s in shapes], tuned, va)
        if rows != info.rows:
            grown_to.add(rows)
        floating = info.dtype.is_floating_point
        changed = any(isinstance(t, Checkpoint) or t.changes(name) for t in tuned)
        dtype = info.dtype if cfg.dtype == "auto" or not floating else getattr(torch, cfg.dtype)
        shape = (rows, *info.shape[1:]) if info.shape else ()
        merge = floating and changed and not any(p.search(name) for p in keep)
        plans.append(TensorPlan(name, shape, dtype, merge, info.rows))
    model_config, tokenizer, notes = output_metadata(cfg, aligned, tuned, va, grown_to, plans)
    return MergePlan(cfg, aligned, tuned, plans, model_config, tokenizer, notes)


def out_rows(name: str, shape: tuple, tuned_shapes: list[tuple], tuned: list[Source], va: int | None) -> int:
    """Output rows of one tensor: the aligned rows, or more when fine-tuning added tokens."""
    rows = shape[0] if shape else 1
    grown = {s[0] for s in tuned_shapes if tuple(s) != tuple(shape)}
    for s, t in zip(tuned_shapes, tuned):
        if tuple(s) == tuple(shape):
            continue
        vocab_like = len(shape) == 2 and shape[0] == va and tuple(s[1:]) == tuple(shape[1:]) and s[0] > shape[0]
        if not vocab_like:
            raise IncompatibleModelsError(
                f"tensor {name} has shape {list(shape)} in the aligned model but {list(s)} in {t.spec}; "
                "only added vocabulary rows can differ"
            )
    if len(grown) > 1 or (grown and any(tuple(s) == tuple(shape) for s in tuned_shapes)):
        raise IncompatibleModelsError(f"the fine-tuned inputs disagree on the rows of {name}: {sorted({s[0] for s in tuned_shapes})}; merge fine-tunes that share a tokenizer")
    return grown.pop() if grown else rows


def output_metadata(cfg, aligned, tuned, va, grown_to, plans):
    notes = []
    model_config = dict(aligned.config)
    tokenizer_source = aligned
    if grown_to:
        vt = grown_to.pop()
        stale = [t.name for t in plans if len(t.shape) == 2 and t.shape[0] == va]
        if stale:
            raise IncompatibleModelsError(
                f"the fine-tuned model(s) have {vt} vocabulary rows but give only {va} for {some(stale)}; "
                "save that tensor with the fine-tune (for an adapter: modules_to_save)"
            )
        first = tuned[0]
        if isinstance(first, Checkpoint):
            model_config = dict(first.config)
        model_config["vocab_size"] = vt
        tokenizer_source = first
        notes.append(f"vocabulary grew from {va} to {vt} tokens: shared rows merged, added rows are the fine-tuned models' mean; tokenizer from {first.spec}")
    tokenizer = tokenizer_files(tokenizer_source.path)
    if not tokenizer:
        raise CheckpointError(f"{tokenizer_source.path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); the merged model needs them: copy them there")
    if cfg.dtype != "auto":
        keys = [k for k in ("dtype", "torch_dtype") if k in model_config] or ["dtype"]
        model_config.update({k: cfg.dtype for k in keys})
    return model_config, tokenizer, notes
