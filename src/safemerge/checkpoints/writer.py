"""Streaming sharded safetensors writer and an atomic output directory.

The shapes and dtypes of every output tensor are known before the first one is computed,
so each shard's header is written first and tensor data is then appended as it streams
in, piece by piece: no shard is ever held in memory. A background thread does the
writing (and periodic ``fdatasync``, so the disk works while the CPU merges); the
directory appears at its final path only once everything in it is on disk.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from safemerge.checkpoints.files import DTYPE_NAMES
from safemerge.errors import ConfigError, SafemergeError

SYNC_EVERY = 256 << 20  # start writeback every 256 MiB instead of all at the end


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow this one."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes the planned tensors, in plan order, into sharded safetensors files.

    ``write`` takes the next piece of the current tensor (whole tensor or consecutive rows)
    and returns at once unless ``IN_FLIGHT`` bytes already wait; a background thread writes
    them. ``finish`` waits, fsyncs, writes the index and returns the weight map. An error in
    the thread is raised in the caller at its next call.
    """

    IN_FLIGHT = 128 << 20

    def __init__(self, directory: Path, entries: list[Entry], shard_size: int, metadata: dict[str, str]):
        self.directory = directory
        self.shards = plan_shards(entries, shard_size)
        self.files = shard_names(len(self.shards))
        self.metadata = metadata
        self._order = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._next = 0  # index into _order of the tensor being written
        self._left = self._order[0][1].nbytes if self._order else 0
        self._pending: deque = deque()
        self._pending_bytes = 0
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="safemerge-writer", daemon=True)
        self._thread.start()

    # -- caller side --
    def write(self, name: str, data: Tensor) -> None:
        shard, entry = self._order[self._next] if self._next < len(self._order) else (None, None)
        if entry is None or name != entry.name or data.dtype != entry.dtype:
            raise RuntimeError(f"writer expected {entry and entry.name} ({entry and entry.dtype}), got {name} ({data.dtype})")
        data = data.contiguous()
        nbytes = data.numel() * data.element_size()
        if nbytes > self._left:
            raise RuntimeError(f"writer got {nbytes} bytes for {name}, only {self._left} left")
        with self._cond:
            while self._pending_bytes and self._pending_bytes + nbytes > self.IN_FLIGHT and self._error is None:
                self._cond.wait()
            self._raise()
            self._pending.append((shard, data))
            self._pending_bytes += nbytes
            self._cond.notify_all()
        self._left -= nbytes
        while self._left == 0 and self._next < len(self._order):
            self._next += 1
            self._left = self._order[self._next][1].nbytes if self._next < len(self._order) else -1

    def finish(self) -> dict[str, str]:
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished before {self._order[self._next][1].name}")
        self._stop()
        self._raise()
        weight_map = {e.name: self.files[i] for i, e in self._order}
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for _, e in self._order)}, "weight_map": weight_map}
            write_file(self.directory / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        """Drop what waits and stop the thread (the caller removes the directory)."""
        with self._cond:
            self._pending.clear()
            self._pending_bytes = 0
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, RuntimeError("the writer already failed")
            raise err

    # -- writer thread --
    def _next_item(self):
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            return self._pending[0] if self._pending else None

    def _done_item(self, nbytes: int) -> None:
        with self._cond:
            if self._pending:  # empty after abort()
                self._pending.popleft()
                self._pending_bytes -= nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        current, fd, unsynced = -1, None, 0
        try:
            while (item := self._next_item()) is not None:
                shard, data = item
                if shard != current:
                    if fd is not None:
                        os.fsync(fd)
                        os.close(fd)
                        fd = None
                    current, unsynced = shard, 0
                    fd = os.open(self.directory / self.files[shard], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    write_all(fd, memoryview(safetensors_header(self.shards[shard], self.metadata)))
                nbytes = data.numel() * data.element_size()
                if nbytes:
                    write_all(fd, memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                unsynced += nbytes
                if unsynced >= SYNC_EVERY:
                    os.fdatasync(fd)
                    unsynced = 0
                self._done_item(nbytes)
            if fd is not None:
                os.fsync(fd)
        except BaseException as e:  # handed to the caller's thread
            with self._cond:
                self._error = disk_error(e, self.directory)
                self._cond.notify_all()
        finally:
            if fd is not None:
                os.close(fd)


def write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data):]


def disk_error(e: BaseException, where: Path) -> BaseException:
    """An OSError while writing becomes one user-facing line; anything else stays a bug."""
    if not isinstance(e, OSError):
        return e
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SafemergeError(f"no space left on the device of {where} (or no free inodes); free some space or choose another --out")
    return SafemergeError(f"cannot write {e.filename or where}: {e.strerror}; check the permissions and space of --out")


def write_file(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    fd = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(fd, memoryview(data))
        os.fsync(fd)
    except OSError as e:
        raise disk_error(e, path.parent) from None
    finally:
        if fd is not None:
            os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    write_file(dst, src.read_bytes())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out(out: Path, force: bool) -> Path:
    """The absolute output path, if it may be written (an existing one only with ``force``)."""
    out = Path(os.path.abspath(out))
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    return out


def remove_stale_temporaries(out: Path) -> None:
    """Temporary directories that a killed run (kill -9, power loss) left beside ``out``: only
    those of this host whose process is gone, so another run's work in progress is never touched.
    (A `.old-` directory is never removed here: it may hold the user's previous output.)"""
    prefix = f".{out.name}.tmp-{socket.gethostname()}-"
    if not out.parent.is_dir():
        return
    for path in out.parent.iterdir():
        pid = path.name.removeprefix(prefix)
        if path.name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@contextmanager
def atomic_directory(out: Path, force: bool):
    """Yield a temporary directory beside ``out``; rename it to ``out`` only on success.

    On any exception (Ctrl-C and a full disk included) the temporary directory, and any
    parent directory made for it, is removed and an existing ``out`` is left as it was.
    With ``force`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = check_out(out, force)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:  # one block from mkdir on: a signal just after mkdir still removes the directory
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise ConfigError(f"cannot create a directory beside {out}: {e.strerror}; choose another --out") from None
        yield tmp
        fsync_dir(tmp)
        publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        if isinstance(e, OSError):
            raise disk_error(e, out.parent) from None
        raise


def publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and restored on failure."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)


def remove_made(made: list[Path]) -> None:
    for p in made:  # deepest first
        try:
            p.rmdir()
        except OSError:
            pass
