"""The sandbox, on real subprocesses: outcomes, limits, refused actions, kernel confinement, cleanup."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from safemerge.evaluation.tasks.sandbox import STDERR_TAIL_CHARS, ExecResult, run_program, run_programs


def test_outcomes_come_back_in_order():
    sources = ["assert sum(range(5)) == 10", "assert 1 + 1 == 3, 'wrong sum'", "raise SystemExit(7)", "def f(:"]
    results = run_programs(sources, timeout=5, workers=3)
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed"]
    assert [r.returncode for r in results] == [0, 1, 7, 1]
    assert "AssertionError: wrong sum" in results[1].stderr_tail
    assert "SyntaxError" in results[3].stderr_tail
    assert all(isinstance(r, ExecResult) and r.seconds > 0 for r in results)


def test_endless_loop_times_out():
    result = run_program("while True:\n    pass\n", timeout=1)
    assert result.status == "timeout"
    assert 1 <= result.seconds < 5


@pytest.mark.parametrize("hog", ["x = bytearray(4 * 2**30)", "x = []\nwhile True:\n    x.append(bytearray(2**20))\n"])
def test_memory_hog_is_killed(hog):
    result = run_program(hog, timeout=5, memory_mb=256)
    assert result.status == "killed"


def test_writes_inside_are_allowed_and_the_directory_is_removed():
    source = (
        "import os, sys, tempfile\n"
        "open('notes.txt', 'w').write('inside')\n"
        "os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt'); os.remove('sub/notes.txt'); os.rmdir('sub')\n"
        "tempfile.NamedTemporaryFile(delete=False).write(b'x')\n"
        "open(os.devnull, 'w').write('discarded')\n"
        "print('CWD=' + os.getcwd(), file=sys.stderr)\n"
    )
    result = run_program(source, timeout=5)
    assert result.status == "passed", result.stderr_tail
    cwd = Path(result.stderr_tail.split("CWD=")[1].strip())
    assert cwd.is_absolute() and cwd != Path.cwd()
    assert not cwd.exists() and not cwd.parent.exists()


@pytest.mark.parametrize("action", [
    "open(TARGET, 'w').write('escaped')",
    "import os\nos.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
    "open('inside.txt', 'w').write('x')\nimport os\nos.rename('inside.txt', TARGET)",
    "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('through a link')",
    "import shutil\nopen('inside.txt', 'w').write('x')\nshutil.copyfile('inside.txt', TARGET)",
    "import os\nos.system('touch ' + TARGET)",
    "import subprocess\nsubprocess.run(['touch', TARGET])",
])
def test_writing_outside_is_blocked(tmp_path, action):
    target = tmp_path / "escaped.txt"
    result = run_program(f"TARGET = {str(target)!r}\n{action}\n", timeout=5)
    assert result.status == "blocked", result.stderr_tail
    assert "safemerge-sandbox: blocked" in result.stderr_tail
    assert not target.exists()


@pytest.mark.parametrize("action", [
    "import os\nos.remove(VICTIM)",
    "import os\nos.chmod(VICTIM, 0o777)",
    "import shutil\nshutil.rmtree(VICTIM_DIR)",
    "import os\nos.rmdir(EMPTY_DIR)",
])
def test_deleting_or_changing_outside_is_blocked(tmp_path, action):
    victim_dir, empty_dir = tmp_path / "keep", tmp_path / "empty"
    victim_dir.mkdir()
    empty_dir.mkdir()
    victim = victim_dir / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o600)
    header = f"VICTIM = {str(victim)!r}\nVICTIM_DIR = {str(victim_dir)!r}\nEMPTY_DIR = {str(empty_dir)!r}\n"
    result = run_program(header + action + "\n", timeout=5)
    assert result.status == "blocked", result.stderr_tail
    assert victim.read_text() == "keep me" and victim.stat().st_mode & 0o777 == 0o600
    assert empty_dir.is_dir()


def test_socket_is_blocked_and_nothing_connects():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        source = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        result = run_program(source, timeout=5)
        assert result.status in ("blocked", "failed")
        assert result.status == "blocked", result.stderr_tail  # the audit hook refuses before the kernel would
        with pytest.raises(TimeoutError):
            server.accept()


def test_kernel_refuses_a_write_the_audit_hook_cannot_see(tmp_path):
    # os.open's audit event does not carry dir_fd, so the hook sees a relative (inside) path: Landlock must refuse
    source = (
        "import os\n"
        f"outside = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.open('escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=outside)\n"
    )
    result = run_program(source, timeout=5)
    if not result.filesystem_confined:
        pytest.skip("Landlock is not available on this kernel")
    assert result.status == "failed"
    assert "PermissionError" in result.stderr_tail
    assert not (tmp_path / "escaped.txt").exists()


def test_network_namespace_has_only_loopback():
    source = (
        "lines = open('/proc/self/net/dev').read().splitlines()[2:]\n"
        "names = {line.split(':')[0].strip() for line in lines}\n"
        "assert names == {'lo'}, names\n"
    )
    result = run_program(source, timeout=5)
    if not result.network_isolated:
        pytest.skip("network namespaces are refused here")
    assert result.status == "passed", result.stderr_tail


def test_program_has_no_capabilities():
    source = (
        "fields = dict(line.split(':\\t') for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)\n"
        "for name in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):\n"
        "    assert int(fields[name], 16) == 0, (name, fields[name])\n"
        "assert int(fields['NoNewPrivs']) == 1\n"
    )
    result = run_program(source, timeout=5)
    assert result.status == "passed", result.stderr_tail


def test_stderr_tail_is_bounded():
    result = run_program("import sys\nsys.stderr.write('x' * 100_000 + 'END')\nraise SystemExit(1)\n", timeout=5)
    assert result.status == "failed"
    assert len(result.stderr_tail) == STDERR_TAIL_CHARS and result.stderr_tail.endswith("END")
