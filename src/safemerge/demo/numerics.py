"""The demo's pinned numerics: the same tiny model, fine-tunes and figures on every x86-64 machine.

Float sums depend on how a kernel splits them: the thread count, and the vector width torch and MKL pick for
this CPU (AVX2 on one laptop, AVX-512 on another). Training amplifies a last-bit difference into other
weights, and other weights into other figures. The demo therefore runs with a fixed thread count and the
AVX2 code paths of torch (ATEN_CPU_CAPABILITY), MKL (MKL_CBWR in strict mode: conditional numerical
reproducibility whose GEMMs give the same bits at any thread count; without STRICT they did not) and
oneDNN, which every x86-64 CPU of the last decade has. These are read when the libraries load, so
`safemerge demo` starts itself again in a child process with them set (``run_pinned``). Elsewhere (ARM) the
figures can differ in the last digit.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence

THREADS = 2
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
          "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


def can_pin() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def is_pinned() -> bool:
    return all(os.environ.get(name) == value for name, value in PINNED.items())


def pinned_environment() -> dict[str, str]:
    return {**os.environ, **PINNED}


def run_pinned(args: Sequence[str]) -> int:
    """`python -m safemerge ARGS` in a child process with the pinned numerics; its exit code."""
    child = subprocess.Popen([sys.executable, "-m", "safemerge", *args], env=pinned_environment())
    try:
        return child.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C and cleans up after itself
        return child.wait()


def pin_threads() -> int:
    """Set torch's thread count to THREADS; returns the previous one, to restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    return before
