"""BLAS thread count: the one place that sets it.

OpenBLAS (and MKL, and OpenMP) read their thread count once, when NumPy loads, so this must
run before ``import numpy``. This module imports nothing heavy for that reason.
"""
from __future__ import annotations

import os
import sys

__all__ = ["set_blas_threads"]

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
    if openmp is not None:
        os.environ["OMP_NUM_THREADS"] = str(openmp)
