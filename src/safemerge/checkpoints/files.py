"""Reading weight files by hand: safetensors headers, tensors read with pread (pickle only when allowed), content hashes, JSON."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import threading
import zipfile
from dataclasses import dataclass
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
        self._lock = threading.Lock()
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
        with self._lock:  # statistic passes read from several threads; pread itself is thread-safe
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


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; fix or re-download it") from None
