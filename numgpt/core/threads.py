"""BLAS thread count: the one place that sets it.

OpenBLAS (and MKL, and OpenMP) read their thread count once, when NumPy loads, so this must
run before ``import numpy``. This module imports nothing heavy for that reason.
"""
from __future__ import annotations

import os
import sys

__all__ = ["set_blas_threads", "let_openmp_threads_sleep"]

# NUMBA_NUM_THREADS: the fast path's kernels (core/kernels.py) obey the same count
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def set_blas_threads(n: int, *, openmp: int | None = None, warn: bool = True) -> None:
    """Make NumPy's BLAS use ``n`` threads. ``openmp`` sets ``OMP_NUM_THREADS`` separately
    (PyTorch's intra-op pool reads it), defaulting to ``n``. Warns when NumPy is already
    loaded, since the setting then has no effect."""
    if warn and "numpy" in sys.modules:
        print("numgpt: warning: NumPy is already loaded; --threads has no effect", file=sys.stderr)
    for var in BLAS_THREAD_VARS:
        os.environ[var] = str(n)
    let_openmp_threads_sleep()
    if openmp is not None:
        os.environ["OMP_NUM_THREADS"] = str(openmp)


def let_openmp_threads_sleep() -> None:
    """Make the fast path's OpenMP pool (numba's ``omp`` threading layer) put its threads to
    sleep as soon as a kernel ends, instead of spinning for GNU OpenMP's default spin count.

    The kernels run between BLAS calls, and OpenBLAS has threads of its own: on a 2-core
    machine the pool's spinning threads took the cores the next matrix product needed
    (124M decode with 2 threads: 9.5 tokens/s spinning, 44.6 with ``GOMP_SPINCOUNT=0``).
    GNU OpenMP reads it once, when the first library that uses it loads, and a process
    holds one copy (PyTorch's, when torch was imported first): so ``import numgpt`` and
    ``set_blas_threads`` call this too, before anything heavy loads. A user's own setting
    wins. It changes which thread waits how, never the math."""
    os.environ.setdefault("GOMP_SPINCOUNT", "0")
