"""Tensor sources: Hugging Face model directories and PEFT LoRA adapters, read lazily.

A ``Checkpoint`` knows every tensor's name, dtype and shape from the safetensors headers
and reads any range of rows on demand with ``pread`` into a fresh buffer: no file is
memory-mapped, so reading a 16 GB model costs one tensor's worth of resident memory.
A ``LoraAdapter`` gives, per aligned tensor, the fine-tuned rows ``W + scaling·B @ A``
without ever building the full fine-tuned model. Both hash what they read, so a content
fingerprint comes for free with a merge.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from torch import Tensor

from safemerge.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # byte offset of the data in ``file`` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        per_row = math.prod(self.shape[1:]) if self.shape else 1
        return per_row * self.dtype.itemsize

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


# --- reading safetensors by hand (headers only, then pread) -------------------------------


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header and check it against the file's size."""
    size = path.stat().st_size
    corrupt = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{corrupt} (only {size} bytes); re-download or re-save it")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{corrupt} (header length {n} exceeds the file); it is truncated or corrupt, re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{corrupt} (unreadable header); it is corrupt, re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{corrupt} (its header is not a JSON object); it is corrupt, re-download it")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    infos = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{corrupt} (bad header entry for tensor {name!r}); re-download it") from None
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the file has "
                f"{size} bytes; re-download or re-save it"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{corrupt} (tensor {name} has {end - begin} bytes for shape {list(shape)}); re-download it")
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin)
    return infos, metadata


def pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"{path} ended early at byte {offset + done}; the file is truncated, re-download it")
        done += got


class TensorFiles:
    """Lazy access to the tensors of one or more safetensors or (opt-in) pickle files."""

    def __init__(self, files: list[Path], allow_pickle: bool):
        self.infos: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, Tensor]] = {}
        self._fds: dict[Path, int] = {}
        for path in files:
            if path.suffix == ".safetensors":
                infos, _ = read_safetensors_header(path)
            else:
                infos = self._load_pickle(path, allow_pickle)
            for name, info in infos.items():
                if name in self.infos:
                    raise CheckpointError(f"tensor {name} appears in both {self.infos[name].file} and {path}; remove the stray file")
                self.infos[name] = info

    def _load_pickle(self, path: Path, allow_pickle: bool) -> dict[str, TensorInfo]:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle checkpoint, which can run code when loaded; convert it to safetensors, "
                "or pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        try:  # mmap needs the zip format; legacy torch.save files are read whole
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} holds Python objects other than tensors{what}, which weights_only=True refuses "
                "because loading them may run code; convert it to safetensors where you trust it"
            ) from None
        except Exception as e:  # torch raises many types for broken files
            raise CheckpointError(f"cannot load {path} with weights_only=True: {str(e).splitlines()[0]}; re-download or convert it") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        self._pickled[path] = tensors
        return {k: TensorInfo(k, v.dtype, tuple(v.shape), path, -1) for k, v in tensors.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Rows [r0, r1) of a tensor (all of it when ``rows`` is None), in its stored dtype."""
        info = self.infos[name]
        r0, r1 = rows or (0, info.rows)
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if info.start < 0:
            full = self._pickled[info.file][name]
            return (full[r0:r1] if info.shape else full).contiguous()
        raw = torch.empty((r1 - r0) * info.row_bytes, dtype=torch.uint8)
        if raw.numel():
            pread_into(self._fd(info.file), memoryview(raw.numpy()), info.start + r0 * info.row_bytes, info.file)
        return raw.view(info.dtype).view(shape)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ContentHasher:
    """Content fingerprint: XXH3-128 over (name, dtype, shape, XXH3-128 of the bytes) of every
    tensor, sorted by name, so it ignores sharding and file layout. Fed as rows are read in
    order. XXH3 rather than sha256: it identifies content (provenance, caches) at ~10 GB/s,
    where sha256 would cost a merge seconds of CPU; it is not a defence against tampering."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self._infos = infos
        self._partial: dict[str, tuple[int, xxhash.xxh3_128]] = {}
        self._done: dict[str, str] = {}

    def feed(self, name: str, r0: int, r1: int, data: Tensor) -> None:
        if name in self._done:
            return
        next_row, h = self._partial.get(name, (0, None))
        if r0 != next_row:  # out of order: hash this tensor in full at the end
            self._partial.pop(name, None)
            return
        h = h or xxhash.xxh3_128()
        if data.numel():
            h.update(data.reshape(-1).view(torch.uint8).numpy())
        if r1 >= self._infos[name].rows:
            self._done[name] = h.hexdigest()
            self._partial.pop(name, None)
        else:
            self._partial[name] = (r1, h)

    def digest(self, files: TensorFiles) -> str:
        for name in sorted(self._infos):
            if name not in self._done:
                self._partial.pop(name, None)
                self.feed(name, 0, self._infos[name].rows, files.read(name))
        return combine_digests({n: (i.dtype, i.shape, self._done[n]) for n, i in self._infos.items()})


def combine_digests(tensors: dict[str, tuple[torch.dtype, tuple[int, ...], str]]) -> str:
    """The model fingerprint from each tensor's (dtype, shape, XXH3-128 of its bytes)."""
    top = xxhash.xxh3_128()
    for name in sorted(tensors):
        dtype, shape, digest = tensors[name]
        top.update(f"{name}|{DTYPE_NAMES.get(dtype, dtype)}|{list(shape)}|{digest}\n".encode())
    return top.hexdigest()


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer and chat-template files a model or adapter directory holds."""
    return [directory / n for n in TOKENIZER_FILES if (directory / n).exists()]


# --- model directories -----------------------------------------------------------------


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; fix or re-download it") from None


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


# --- LoRA adapters ---------------------------------------------------------------------

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


def canonical_adapter_config(config: dict) -> bytes:
    """adapter_config.json as bytes that depend on its meaning only, not on set order or key order."""
    fixed = {k: sorted(v) if k in SET_VALUED and isinstance(v, list) else v for k, v in config.items()}
    return json.dumps(fixed, sort_keys=True).encode()


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


# --- resolving what the user typed ------------------------------------------------------


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
    except Exception as e:  # hub errors come in many types
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
