"""BLAS thread count: the one place that sets it; and the other settings a library reads once
when it loads (the OpenMP pool's spin, numba's cache folder).

OpenBLAS (and MKL, and OpenMP) read their thread count once, when NumPy loads, so this must
run before ``import numpy``; numba reads ``NUMBA_CACHE_DIR`` when it loads. This module
imports nothing heavy for that reason.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

__all__ = ["set_blas_threads", "let_openmp_threads_sleep", "kernel_cache_dir", "user_cache_dir",
           "kernel_cache_is_cold", "kernel_index_stamps"]

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


# ----------------------------------------------------------- the compiled kernels' cache

CACHE_ENV = "NUMBA_CACHE_DIR"
KERNELS_PY = Path(__file__).with_name("kernels.py")


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/numgpt/numba``, else ``~/.cache/numgpt/numba``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numgpt" / "numba"


def kernel_cache_dir(package_dir: Path | None = None) -> Path:
    """The folder numba keeps the fast path's compiled kernels in, choosing it first.

    numba caches beside the source, in ``numgpt/core/__pycache__``, when that is writable.
    A package installed read-only (a system site-packages, a read-only image) would compile
    every kernel again in every process (about a minute), so then the cache goes to
    ``user_cache_dir()``: set as ``NUMBA_CACHE_DIR``, which numba reads when it loads (and
    processes numgpt starts, such as MPI ranks, inherit). A ``NUMBA_CACHE_DIR`` the user set
    wins. ``package_dir`` (default this folder) is for tests."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / _cache_subpath(KERNELS_PY)
    core = Path(package_dir) if package_dir is not None else KERNELS_PY.parent
    pycache = core / "__pycache__"
    if os.access(pycache if pycache.is_dir() else core, os.W_OK):
        return pycache
    os.environ[CACHE_ENV] = str(user_cache_dir())
    return user_cache_dir() / _cache_subpath(KERNELS_PY)


def _cache_subpath(py_file: Path) -> str:
    """The folder numba gives a source file's cache under ``NUMBA_CACHE_DIR``: the source
    folder's name and the SHA-1 of its absolute path (numba's get_suitable_cache_subpath)."""
    folder = os.path.dirname(os.path.abspath(py_file))
    return f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"


def kernel_index_stamps() -> dict[str, float]:
    """numba's index files for ``kernels.py`` in the cache folder -> modification time: a
    kernel that compiles (re)writes its index, one that loads from the cache leaves it."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    try:
        return {p.name: p.stat().st_mtime_ns for p in kernel_cache_dir().glob(f"kernels.*.{tag}.nbi")}
    except OSError:
        return {}


def kernel_cache_is_cold() -> bool:
    """True when the kernels will compile rather than load: the cache folder holds no numba
    index file for ``kernels.py`` (``kernels.<function>-<line>.py<XY>.nbi``, one per kernel)
    written since ``kernels.py`` last changed (an edit makes numba compile again). A look at
    a folder, no import, so the CLI can ask before anything heavy loads; a kernel used for
    the first time in a warm folder (a float64 run after float32 ones) is not seen."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    try:
        source = KERNELS_PY.stat().st_mtime
        found = [p.stat().st_mtime for p in kernel_cache_dir().glob(f"kernels.*.{tag}.nbi")]
    except OSError:
        return False  # cannot tell: say nothing
    return not found or max(found) < source
