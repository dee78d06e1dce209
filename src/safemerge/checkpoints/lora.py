"""PEFT LoRA adapters read as deltas: scaling·B @ A per target tensor, without materialising the fine-tuned model."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from torch import Tensor

from safemerge.checkpoints.files import TensorFiles, load_json
from safemerge.errors import CheckpointError

PEFT_PREFIX = "base_model.model."


UNSUPPORTED_LORA = {  # adapter_config key -> what it is; any truthy value is refused
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias (lora_bias=true)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token indices",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
}


@dataclass(frozen=True)
class LoraModule:
    a_key: str
    b_key: str
    scaling: float
    transposed: bool  # weight stored as (in, out): embeddings and fan_in_fan_out layers
    target: str  # the aligned tensor this delta applies to


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: fine-tuned tensor = (saved full tensor or aligned) + scaling·B @ A."""

    path: Path
    spec: str
    config: dict
    files: TensorFiles
    modules: dict[str, LoraModule]  # aligned tensor name -> its LoRA delta
    full: dict[str, str]  # aligned tensor name -> key of a full fine-tuned tensor in the adapter
    _last: tuple[str, Tensor, Tensor] | None = field(default=None, repr=False)

    def changes(self, name: str) -> bool:
        return name in self.modules or name in self.full

    def delta(self, name: str, rows: tuple[int, int]) -> Tensor | None:
        """scaling·B @ A for rows [r0, r1) of the target tensor, in float32, or None."""
        m = self.modules.get(name)
        if m is None:
            return None
        a, b = self._factors(m)
        r0, r1 = rows
        if m.transposed:  # delta = (B @ A)^T, rows of it are columns of A
            out = a[:, r0:r1].T @ b.T
        else:
            out = b[r0:r1] @ a
        return out.mul_(m.scaling)

    def _factors(self, m: LoraModule) -> tuple[Tensor, Tensor]:
        # a tensor is read in several row chunks; keep the last module's factors
        if self._last is None or self._last[0] != m.a_key:
            self._last = (m.a_key, self.files.read(m.a_key).float(), self.files.read(m.b_key).float())
        return self._last[1], self._last[2]

    def tuned(self, name: str, base_rows: Tensor, rows: tuple[int, int]) -> Tensor:
        """The fine-tuned float32 rows [r0, r1) of tensor ``name``, given the aligned rows."""
        full = self.files.read(self.full[name], rows).float() if name in self.full else base_rows
        d = self.delta(name, rows)
        return full if d is None else full + d.view(full.shape)

    def fingerprint(self) -> str:
        h = xxhash.xxh3_128()
        for f in sorted({i.file for i in self.files.infos.values()}):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        h.update(canonical_adapter_config(self.config))
        return "xxh3-128:" + h.hexdigest()


# PEFT keeps these as sets and writes them in an order that changes from one Python process to the next
SET_VALUED = ("target_modules", "exclude_modules")


def with_sorted_sets(config: dict) -> dict:
    """adapter_config with its set-valued fields in one order."""
    return {k: sorted(v) if k in SET_VALUED and isinstance(v, list) else v for k, v in config.items()}


def canonical_adapter_config(config: dict) -> bytes:
    """adapter_config.json as bytes that depend on its meaning only, not on set order or key order."""
    return json.dumps(with_sorted_sets(config), sort_keys=True).encode()


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(path: Path, spec: str, allow_pickle: bool) -> LoraAdapter:
    config = load_json(path / "adapter_config.json")
    where = path / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')} is not supported; only LoRA adapters can be merged")
    for key, what in UNSUPPORTED_LORA.items():
        if config.get(key):
            raise CheckpointError(f"{where}: {what} is not supported by safemerge; merge it into the model with peft first and pass the merged directory")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        pickled = path / "adapter_model.bin"
        if not pickled.exists():
            raise CheckpointError(f"{path} has adapter_config.json but no adapter_model.safetensors")
        weights = pickled
    files = TensorFiles([weights], allow_pickle)
    alpha, rank = config.get("lora_alpha"), config.get("r")
    if not alpha or not rank:
        raise CheckpointError(f"{where} lacks lora_alpha or r")
    modules, full, halves = {}, {}, {}
    for key in files.infos:
        name = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if match:
            module = match.group(1) or match.group(3)
            part = (match.group(2) or match.group(4))[-1]
            halves.setdefault(module, {})[part] = key
            halves[module]["embedding"] = match.group(3) is not None
        elif "lora_" in name or ".modules_to_save." in name:
            raise CheckpointError(f"{weights}: tensor {key} is of an adapter kind safemerge does not support; merge it with peft first")
        else:
            full[name.replace(".base_layer.", ".")] = key
    for module, parts in halves.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{weights}: module {module} has only one of lora_A / lora_B; the adapter is incomplete")
        r = files.infos[parts["A"]].shape[0]
        a = pattern_value(config.get("alpha_pattern"), module, alpha)
        scaling = a / math.sqrt(r) if config.get("use_rslora") else a / r
        transposed = parts["embedding"] or bool(config.get("fan_in_fan_out"))
        modules[f"{module}.weight"] = LoraModule(parts["A"], parts["B"], scaling, transposed, f"{module}.weight")
    if not modules and not full:
        raise CheckpointError(f"{weights} holds no LoRA tensors")
    return LoraAdapter(path, spec, config, files, modules, full)
