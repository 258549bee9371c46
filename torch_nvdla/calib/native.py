"""The optional C kernels (``_kernels.c``) and how many threads they may use.

Design notes: ``docs/calib.md`` (the C kernels).
"""

from __future__ import annotations

import os
import re

import torch

try:  # built by setup.py where a C compiler is present
    from . import _kernels as kernels
except ImportError:  # pragma: no cover - depends on the install
    kernels = None

__all__ = ["KERNELS", "kernels", "openmp_runtimes", "threads"]

#: Whether the C kernels run: built, and not turned off by ``TORCH_NVDLA_KERNELS=torch``
#: (every kernel has a torch path giving the same results).
KERNELS = kernels is not None and os.environ.get("TORCH_NVDLA_KERNELS", "") != "torch"

_OPENMP_LIBRARY = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[^/]*$")


def openmp_runtimes(maps_lines) -> set[str]:
    """The OpenMP runtime libraries (libgomp, libiomp5, libomp) among ``/proc/<pid>/maps``
    lines: each distinct file once."""
    return {line.split()[-1] for line in maps_lines if _OPENMP_LIBRARY.search(line.rstrip())}


def _one_openmp_runtime() -> bool:
    """The kernels were built with OpenMP and exactly one OpenMP runtime is loaded (Linux):
    then their threads are torch's own, already running, and splitting work over them
    oversubscribes nothing. Anywhere else the kernels run on the calling thread."""
    if kernels is None or not kernels.openmp():
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return len(openmp_runtimes(maps)) == 1
    except OSError:
        return False


SHARED_OPENMP = _one_openmp_runtime()


def threads() -> int:
    """Threads a kernel may split one call over: torch's intra-op threads when it shares
    their OpenMP runtime, else 1."""
    return torch.get_num_threads() if SHARED_OPENMP else 1
