"""Run untrusted Python programs (model-written code) one per subprocess, with limits.

Each program runs as ``python -I -B`` (isolated: no PYTHON* variables, no user site; installed packages
stay importable, as in the original HumanEval harness) in a new session (process group), in a fresh
temporary working directory that is removed afterwards, with stdin from /dev/null, stdout discarded and
a minimal environment. Before the program's first line, a bootstrap in the child (this file, run as a script)
sets up, in this order:

1. resource limits: address space (``memory_mb``), CPU seconds (timeout + 1), file size (16 MB), no core
   files, no new processes (RLIMIT_NPROC = 0; the kernel does not apply it to uid 0);
2. a new, empty network namespace (``unshare(CLONE_NEWNET)``, or inside a new user namespace when
   unprivileged); when the kernel refuses, the program runs with the host network and
   ``ExecResult.network_isolated`` is False;
3. no capabilities: the bounding set is emptied and all capabilities are dropped, with no_new_privs, so
   a program started as root keeps uid 0 (it can still read and run the interpreter) but loses every
   root privilege (raising limits, mounting, overriding file permissions, ...);
4. Landlock (Linux >= 5.13): the kernel refuses every file-system write (create, write, truncate,
   remove, rename, link, mknod) outside the working directory (and /dev/null), and on newer kernels
   also TCP bind/connect and signals to processes outside the sandbox. ``ExecResult.filesystem_confined``
   says whether it applied;
5. a Python audit hook (``sys.addaudithook``) that ends the program with status "blocked" when it tries
   to write, create, remove, rename or chmod a file outside its directory, start or signal a process,
   use a socket, load or call native code through ctypes, raise its limits, or walk the garbage
   collector's object graph.

The audit hook is NOT a security boundary: code inside the same interpreter that is written to escape
can get around it (through objects the bootstrap left reachable, or C extensions). It exists to stop
accidents early and to report them clearly. The kernel parts (limits, namespace, capabilities,
Landlock) hold against such code: a process it manages to start inherits all of them. What they do
not give: read confinement (the program may read any file its uid can read, the network namespace
aside) and, for uid 0, a limit on process count; a process that leaves the session with setsid is not
killed by the timeout. For hostile code, run the whole evaluation in a container or VM as well.

Statuses: "passed" (exit 0), "failed" (any other exit, e.g. an assertion), "timeout" (wall clock or CPU
limit), "killed" (memory limit: MemoryError, or killed by a signal such as SIGKILL/SIGSEGV),
"blocked" (refused by the audit hook).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

STATUSES = ("passed", "failed", "timeout", "killed", "blocked")
BLOCKED_EXIT = 113  # exit code of a program the audit hook stopped
MEMORY_EXIT = 114  # exit code of a program that ran out of memory (MemoryError)
FILE_SIZE_LIMIT = 16 * 2**20
STDERR_TAIL_CHARS = 2000
MARKER = "safemerge-sandbox:"  # prefix of the bootstrap's own lines on stderr


@dataclass(frozen=True)
class ExecResult:
    status: str  # one of STATUSES
    returncode: int | None  # negative: killed by that signal; None: killed at the timeout
    stderr_tail: str  # the last STDERR_TAIL_CHARS characters of stderr
    seconds: float  # wall-clock time
    network_isolated: bool = False  # ran in its own empty network namespace
    filesystem_confined: bool = False  # Landlock confined its writes to its directory


# ---------------------------------------------------------------- parent side


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run one Python program in its own sandboxed subprocess and report how it ended."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")
    root = tempfile.mkdtemp(prefix="safemerge-sandbox-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        program = os.path.join(work, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(root, "stderr"), "w+b") as stderr:
            returncode, timed_out, seconds, report = _run_child(work, program, stderr, timeout, memory_mb)
            tail = _tail(stderr)
    finally:
        _remove_tree(root)
    return ExecResult(
        status=_status(returncode, timed_out),
        returncode=returncode,
        stderr_tail=tail,
        seconds=seconds,
        network_isolated=bool(report.get("network_isolated")),
        filesystem_confined=bool(report.get("filesystem_confined")),
    )


def run_programs(sources: Sequence[str], *, timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None) -> list[ExecResult]:
    """run_program for many programs, `workers` at a time (default: one per CPU); results in input order."""
    if not sources:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(sources)))
    run = partial(run_program, timeout=timeout, memory_mb=memory_mb)
    if workers == 1:
        return [run(source) for source in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, sources))


def _run_child(work: str, program: str, stderr, timeout: float, memory_mb: int):
    report_read, report_write = os.pipe()
    argv = [sys.executable, "-I", "-B", os.path.abspath(__file__), work, program, str(report_write),
            str(timeout), str(memory_mb)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=work,
                                env=_minimal_env(work), start_new_session=True, pass_fds=(report_write,))
    finally:
        os.close(report_write)
    with os.fdopen(report_read, "rb") as report_pipe:
        try:
            returncode, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            returncode, timed_out = None, True
        seconds = time.monotonic() - start
        _kill_group(proc.pid)  # whatever it left behind in its session
        report = _parse_report(report_pipe.read())
    return returncode, timed_out, seconds, report


def _minimal_env(work: str) -> dict[str, str]:
    # one thread for numerical libraries: no new threads are allowed, and programs already run in parallel
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **threads}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse_report(raw: bytes) -> dict:
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {}


def _status(returncode: int | None, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == BLOCKED_EXIT:
        return "blocked"
    if returncode == MEMORY_EXIT or returncode in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT):
        return "killed"
    return "failed"


def _tail(stream) -> str:
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - 4 * STDERR_TAIL_CHARS))
    return stream.read().decode("utf-8", errors="replace")[-STDERR_TAIL_CHARS:]


def _remove_tree(path: str) -> None:
    """Remove the sandbox directory, even where the program took away its own permissions."""
    def make_writable_and_retry(function, failed_path, _exc_info):
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, 0o700)
            shutil.rmtree(failed_path, onerror=make_writable_and_retry)
        else:
            function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)


# ---------------------------------------------------------------- child side (this file run as a script)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1


def _syscall_numbers() -> dict[str, int] | None:
    """Numbers of the syscalls libc has no wrapper for (Landlock's are the same on every architecture)."""
    capset = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)
    if not sys.platform.startswith("linux") or capset is None:
        return None
    return {"capset": capset, "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446}


def _set_limits(timeout: float, memory_mb: int) -> None:
    cpu = math.ceil(timeout) + 1
    limits = [
        (resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, 0, 0),
    ]
    for which, soft, hard in limits:
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):  # a hard limit already lower than ours stays
            pass


def _isolate_network(libc) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return True
    return False


def _drop_privileges(libc, numbers: dict[str, int] | None) -> None:
    """Empty the capability bounding set and all capability sets; set no_new_privs (Landlock needs it)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0)  # fails harmlessly without CAP_SETPCAP
    libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0)
    if numbers is None:
        return
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    libc.syscall(ctypes.c_long(numbers["capset"]), header, data)


def _confine_writes(libc, numbers: dict[str, int] | None, work: str) -> bool:
    """Landlock: writes only beneath `work` (and to /dev/null); TCP and outward signals refused when supported."""
    import ctypes

    if numbers is None:
        return False
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(numbers["landlock_create_ruleset"]), None, ctypes.c_long(0),
                  ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return False
    write_file, truncate = 1 << 1, 1 << 14
    fs = write_file | sum(1 << bit for bit in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
    if abi >= 2:
        fs |= 1 << 13  # refer (link or rename across directories)
    if abi >= 3:
        fs |= truncate
    net = 0b11 if abi >= 4 else 0  # TCP bind, TCP connect
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall(ctypes.c_long(numbers["landlock_create_ruleset"]), attr, ctypes.c_long(size), ctypes.c_long(0))
    if ruleset < 0:
        return False
    try:
        rules = [(work, fs, os.O_DIRECTORY), (os.devnull, write_file | (truncate if abi >= 3 else 0), 0)]
        for path, access, kind in rules:
            if not _add_path_rule(syscall, numbers, ruleset, path, access, kind):
                return False
        return syscall(ctypes.c_long(numbers["landlock_restrict_self"]), ctypes.c_long(ruleset), ctypes.c_long(0)) == 0
    finally:
        os.close(ruleset)


def _add_path_rule(syscall, numbers: dict[str, int], ruleset: int, path: str, access: int, kind: int) -> bool:
    import ctypes

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    fd = os.open(path, os.O_PATH | os.O_CLOEXEC | kind)
    try:
        rule = PathBeneath(access, fd)
        return syscall(ctypes.c_long(numbers["landlock_add_rule"]), ctypes.c_long(ruleset),
                       ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_long(0)) == 0
    finally:
        os.close(fd)


# events refused whatever their arguments, and event-name prefixes refused
REFUSED_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "webbrowser.open",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
REFUSED_PREFIXES = ("socket.", "ctypes.")
# events that change the file system: (index of a path argument, index of its dir_fd argument or None)
PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _audit_hook(work: str):
    """The hook: refuses the events above, and file-system changes outside `work`, by ending the process."""
    root = os.path.realpath(work)
    writable_files = (os.devnull,)

    def resolve(path, dir_fd) -> str | None:
        if isinstance(path, int):  # an open descriptor: what it points to, if it is a file at all
            target = os.readlink(f"/proc/self/fd/{path}")
            return target if target.startswith("/") else None
        path = os.fsdecode(os.fspath(path))
        if dir_fd not in (None, -1, -100) and not os.path.isabs(path):  # -100: AT_FDCWD
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)

    def outside(path, dir_fd=None) -> bool:
        try:
            resolved = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return True  # what cannot be resolved is not known to be inside
        if resolved is None or resolved in writable_files:
            return False
        return resolved != root and not resolved.startswith(root + os.sep)

    def refuse(event: str, args) -> None:
        try:
            detail = repr(args)[:300]
        except Exception:  # noqa: BLE001 -- the program's own __repr__ may raise anything
            detail = "..."
        os.write(2, f"\n{MARKER} blocked {event} {detail}\n".encode(errors="replace"))
        os._exit(BLOCKED_EXIT)

    def hook(event: str, args) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (flags or 0) & WRITE_FLAGS or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and not isinstance(path, int) and outside(path):
                refuse(event, args)
        elif event in PATH_EVENTS:
            for path_at, dir_fd_at in PATH_EVENTS[event]:
                if outside(args[path_at], None if dir_fd_at is None else args[dir_fd_at]):
                    refuse(event, args)
        elif event in REFUSED_EVENTS or event.startswith(REFUSED_PREFIXES):
            refuse(event, args)

    return hook


def _child_main(work: str, program: str, report_fd: int, timeout: float, memory_mb: int) -> None:
    import ctypes

    _set_limits(timeout, memory_mb)
    libc = ctypes.CDLL(None, use_errno=True)
    numbers = _syscall_numbers()
    network_isolated = _isolate_network(libc)
    _drop_privileges(libc, numbers)
    filesystem_confined = _confine_writes(libc, numbers, work)
    report = {"network_isolated": network_isolated, "filesystem_confined": filesystem_confined}
    os.write(report_fd, json.dumps(report).encode())
    os.close(report_fd)
    del libc

    with open(program, encoding="utf-8") as f:
        source = f.read()
    main = types.ModuleType("__main__")  # the program runs as a script of its own, not inside this module
    main.__file__ = program
    sys.modules["__main__"] = main
    sys.argv = [program]
    sys.addaudithook(_audit_hook(work))
    try:
        exec(compile(source, program, "exec"), main.__dict__)  # noqa: S102 -- running it is the point
    except MemoryError:
        os.write(2, f"\n{MARKER} MemoryError (memory limit {memory_mb} MB)\n".encode())
        os._exit(MEMORY_EXIT)


if __name__ == "__main__":
    _work, _program, _report_fd, _timeout, _memory_mb = sys.argv[1:6]
    _child_main(_work, _program, int(_report_fd), float(_timeout), int(_memory_mb))
