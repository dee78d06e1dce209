"""Tensor sources: Hugging Face model directories and PEFT LoRA adapters, read lazily.

A ``Checkpoint`` knows every tensor's name, dtype and shape from the safetensors headers
and reads any range of rows on demand with ``pread`` into a fresh buffer: no file is
memory-mapped, so reading a 16 GB model costs one tensor's worth of resident memory.
A ``LoraAdapter`` gives, per aligned tensor, the fine-tuned rows ``W + scaling·B @ A``
without ever building the full fine-tuned model. Both hash what they read, so a content
fingerprint comes for free with a merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from safemerge.checkpoints.files import ContentHasher, TensorFiles, TensorInfo, load_json
from safemerge.checkpoints.lora import LoraAdapter, open_adapter
from safemerge.errors import CheckpointError, hub_errors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer and chat-template files a model or adapter directory holds."""
    return [directory / n for n in TOKENIZER_FILES if (directory / n).exists()]


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory, preferring safetensors over pickles."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; re-download the model")
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{directory} lacks shard(s) listed in {index_name}: {', '.join(missing[:3])}; re-download them")
            return files
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        found = sorted(p for p in directory.glob(pattern) if not p.name.startswith("adapter_") and "optimizer" not in p.name)
        if found:
            return found
    return []


@dataclass
class Checkpoint:
    """A Hugging Face model directory: config.json plus safetensors (or opt-in pickle) weights."""

    path: Path
    spec: str  # as the user gave it: a path or a Hub id
    config: dict
    files: TensorFiles
    hasher: ContentHasher = field(init=False)

    def __post_init__(self):
        self.hasher = ContentHasher(self.files.infos)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.files.infos

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        info = self.infos[name]
        r0, r1 = rows or (0, info.rows)
        data = self.files.read(name, (r0, r1))
        self.hasher.feed(name, r0, r1, data)
        return data

    def fingerprint(self) -> str:
        return "xxh3-128:" + self.hasher.digest(self.files)


def open_checkpoint(path: Path, spec: str, allow_pickle: bool) -> Checkpoint:
    files = weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has no weight files (model.safetensors or shards); is it the right directory?")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has weights but no config.json; copy the model's config.json next to them")
    return Checkpoint(path, spec, load_json(path / "config.json"), TensorFiles(files, allow_pickle))


def resolve(spec: str, allow_pickle: bool = False) -> Path:
    """A local directory as given, or a Hub id downloaded (weights, configs, tokenizer only)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{spec} is a file; give the model's directory instead")
        return path
    if not HUB_ID.match(spec):
        raise CheckpointError(f"{spec} does not exist; give a model directory, a LoRA adapter directory or a Hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"] + (["*.bin"] if allow_pickle else [])
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except hub_errors() as e:
        raise CheckpointError(f"{spec} is not a local directory and could not be fetched from the Hub: {str(e).splitlines()[0]}") from None


def open_source(spec: str, *, allow_pickle: bool = False) -> Checkpoint | LoraAdapter:
    """Open a model directory or LoRA adapter (local path or Hub id), headers only."""
    path = resolve(spec, allow_pickle)
    if (path / "adapter_config.json").exists():
        return open_adapter(path, spec, allow_pickle)
    if (path / "config.json").exists() or weight_files(path):
        return open_checkpoint(path, spec, allow_pickle)
    raise CheckpointError(
        f"{spec} is neither a model directory (config.json + model.safetensors) nor a PEFT adapter (adapter_config.json)"
    )
