"""The GEMM library: which library multiplies numgpt's weight matrices, chosen explicitly.

Two libraries, the one place that knows them:

* ``"openblas"``: NumPy's own BLAS (``numpy.matmul``); always there.
* ``"mkl"``: oneMKL's ``cblas_sgemm``/``cblas_dgemm`` through ``ctypes``, from the PyPI ``mkl``
  wheel (``pip install 'numgpt[mkl]'``, which puts ``libmkl_rt.so`` in ``<sys.prefix>/lib``), a
  path in ``MKL_RT``, or the system's ``libmkl_rt``. Optional: numgpt is correct without it.

``mm(a, b)`` is ``a @ b`` for 2-D float32/float64 arrays, run by the selected library (float64
through ``dgemm``: the verification gates hold float64 to 1e-12). Operands that are transposed
views of C-contiguous arrays go to MKL as ``CblasTrans``, never copied. ``ops.linear`` (forward
and both backward products) and the tied head call it; the attention's small products stay
NumPy's.

Which library runs is never a silent switch: ``select(name)`` (``--gemm`` on the command line,
or ``NUMGPT_GEMM``) or, for ``"auto"``, a measurement recorded once per machine by ``numgpt
compile`` beside the kernel cache (both libraries timed at numgpt's shapes, one process each,
keyed by CPU model), or, with no record, the CPU vendor (GenuineIntel with MKL installed ->
mkl, else openblas; issue 19 measured oneMKL 1.1-1.9x OpenBLAS on an Intel Xeon and OpenBLAS as
fast or faster on an AMD EPYC). ``describe()`` says which one runs and why; ``numgpt info`` and
every computing command print it.

Thread pools: the two libraries keep separate pools, and a spinning idle pool starves the
working one on a small machine (measured on a 2-vCPU EPYC: a 512x768 @ 768x768 MKL product
interleaved with a small NumPy product ran at 97 GFLOP/s with OpenBLAS at 2 threads, 187 with
OpenBLAS at 1). So selecting mkl gives MKL the thread count OpenBLAS had and sets OpenBLAS to
1 thread (the attention's small products stay below its threading threshold anyway);
selecting openblas gives it back. Before MKL loads, ``KMP_BLOCKTIME=0`` (unless the user set
it) makes MKL's OpenMP threads sleep as soon as a product ends, as ``GOMP_SPINCOUNT=0`` does
for the fast path's kernels (core/threads.py): the kernels run between the products.

Nothing heavy loads when this module is imported (the CLI resolves the choice before NumPy
loads, so that ``--threads`` still applies).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import ConfigError

__all__ = ["LIBRARIES", "CHOICES", "ENV", "MKL_ENV", "MKL_MARGIN", "DECODE_ROWS", "SHAPES",
           "ROW_BY_ROW", "available", "resolve", "select", "deselect", "current", "describe",
           "mm", "load",
           "cpu_model", "cpu_vendor", "record_path", "measure", "measure_here", "product_gflops",
           "record_measurement", "decode_rows_text"]

LIBRARIES = ("openblas", "mkl")
CHOICES = ("auto", *LIBRARIES)
ENV = "NUMGPT_GEMM"  # a choice from CHOICES; the --gemm flag sets it for the process
MKL_ENV = "MKL_RT"  # the path of libmkl_rt.so, where it is not in the environment's lib/
MKL_FIX = "pip install 'numgpt[mkl]'"
RECORD_NAME = "gemm.json"
# how much faster (geometric mean over SHAPES) mkl must measure to be recorded for auto: a
# near tie keeps NumPy's own library, which needs no second thread pool
MKL_MARGIN = 1.05

# Which kernel multiplies a decode step's rows (issue 18: 1 to 64 active slots, float32): the
# selected library's GEMM at every row count. `python benchmarks/bench_gemm.py --rows` prints
# OpenBLAS, oneMKL and the candidate rows kernel of issue 18 (`numba-rows`: threads split the
# output columns, each row of a weight block read once for all rows) at 1..64 rows, the block
# shapes and the head (docs/results/bench_gemm.md, one section per CPU). `--quick --rows
# --threads 1` on the shared 2-vCPU AMD EPYC (load ~4): numba-rows ran 0.09-0.75x OpenBLAS at
# every row count and shape, so it is not used. The two libraries are not mixed by row count
# either: their pools in one process starve each other (see the header).
# One entry per (first row, last row, kernel, why).
# OpenBLAS (0.3.30/0.3.31) multiplies 2 or 3 rows by a weight matrix on its GEMM path, which
# measured slower than one GEMV per row: 12 layers' distinct weights per call (so they come
# from memory, as in a decode step), GFLOP/s GEMM -> per row on the 2-vCPU AMD EPYC, 1 thread:
# 2 rows 7.8-9.2 -> 12.0-15.1, 3 rows 10.1-12.7 -> 14.4-19.6, 4 rows 15.4-17.2 -> 17.0-21.6
# (mixed at 2 threads, where 4 rows lost on one shape), 8 rows GEMM as fast or faster. So mm
# runs rows ROW_BY_ROW on OpenBLAS as GEMVs; each row is then the one-row product itself.
# oneMKL keeps its GEMM at every row count (not measured row by row on an Intel Xeon).
ROW_BY_ROW = (2, 3)  # on OpenBLAS, products with this many rows (inclusive) run as GEMVs
DECODE_ROWS = (
    (1, 1, "the selected library's GEMM (gemm.mm)",
     "no kernel of numgpt's own measured faster than OpenBLAS"),
    (ROW_BY_ROW[0], ROW_BY_ROW[1], "openblas: one GEMV per row; mkl: its GEMM",
     "OpenBLAS's small-M GEMM measured slower than a GEMV per row (above)"),
    (ROW_BY_ROW[1] + 1, 64, "the selected library's GEMM (gemm.mm)",
     "no kernel of numgpt's own measured faster than OpenBLAS"),
)

_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112
_MKL_THREADING_INTEL = 0

# the process's choice: (library, why); None until first use or select(). One per process, as
# the thread count is: both are properties of the machine's libraries, not of a computation.
_active: tuple[str, str] | None = None
_openblas_threads: int | None = None  # OpenBLAS's thread count before mkl took the work
_mkl = None  # the loaded libmkl_rt (ctypes.CDLL), or None
_select_lock = threading.RLock()


# ------------------------------------------------------------------------ the machine

def _cpuinfo(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith(key))
    except (OSError, StopIteration):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    return _cpuinfo("model name")


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... from /proc/cpuinfo ("unknown" elsewhere)."""
    return _cpuinfo("vendor_id")


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------ finding MKL

def _mkl_candidates() -> list[str]:
    """Where libmkl_rt is looked for: ``MKL_RT`` alone when set, else the environment's lib/
    (the PyPI wheel) and the system's library path."""
    if os.environ.get(MKL_ENV):
        return [os.environ[MKL_ENV]]
    lib = Path(sys.prefix) / "lib"
    found = [str(lib / name) for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")
             if (lib / name).exists()]
    system = ctypes.util.find_library("mkl_rt")
    return found + ([system] if system else [])


def _mkl_missing(detail: str) -> ConfigError:
    return ConfigError(f"gemm 'mkl': {detail}; install it with {MKL_FIX} (or set {MKL_ENV} to "
                       f"the path of libmkl_rt.so), or use --gemm openblas")


def _load_mkl():
    """libmkl_rt with its CBLAS signatures declared; ConfigError naming the fix when absent."""
    global _mkl
    if _mkl is not None:
        return _mkl
    candidates = _mkl_candidates()
    if not candidates:
        raise _mkl_missing(f"libmkl_rt was not found in {Path(sys.prefix) / 'lib'} nor on the "
                           f"library path")
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # threads sleep between products (see header)
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.cblas_sgemm, lib.cblas_dgemm, lib.MKL_Set_Num_Threads  # noqa: B018 - present?
            break
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    else:
        raise _mkl_missing("libmkl_rt could not be loaded (" + "; ".join(errors) + ")")
    i, p = ctypes.c_int, ctypes.c_void_p
    for name, scalar in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
        fn = getattr(lib, name)
        fn.argtypes = [i, i, i, i, i, i, scalar, p, i, p, i, scalar, p, i]
        fn.restype = None
    lib.MKL_Set_Threading_Layer.argtypes = [i]
    lib.MKL_Set_Threading_Layer(_MKL_THREADING_INTEL)
    lib.MKL_Set_Num_Threads.argtypes = [i]
    lib.MKL_Get_Max_Threads.restype = i
    _probe(lib, path)
    _mkl = lib
    return lib


def _probe(lib, path: str) -> None:
    """One small product of integers (exact in float32 and float64) in each dtype, checked
    before MKL is trusted. libmkl_rt loads its parts into the process's global symbol scope,
    where a copy of MKL loaded earlier wins: PyTorch's libtorch_cpu exports its MKL's
    internals, and with torch imported first every product came out wrong. ctypes arrays,
    not NumPy, so the CLI can load MKL before NumPy (and torch) loads."""
    m, k, n = 6, 16, 48
    a = [float((r * 3 + c) % 7 - 3) for r in range(m) for c in range(k)]  # (m, k)
    b = [float((r + 2 * c) % 5 - 2) for r in range(k) for c in range(n)]  # (k, n)
    want = [sum(a[r * k + j] * b[j * n + c] for j in range(k)) for r in range(m) for c in range(n)]
    for name, ct in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
        A, B, C = (ct * len(a))(*a), (ct * len(b))(*b), (ct * (m * n))()
        getattr(lib, name)(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k, 1.0,
                           ctypes.addressof(A), k, ctypes.addressof(B), n, 0.0, ctypes.addressof(C), n)
        if list(C) != want:
            raise ConfigError(
                f"gemm 'mkl': {path} computed a wrong {name} product in this process (another "
                f"copy of MKL loaded first owns its symbols: PyTorch's does, when torch is "
                f"imported before numgpt selects mkl); select mkl before importing torch "
                f"(numgpt's CLI does), or use --gemm openblas")


def _mkl_version() -> str:
    buf = ctypes.create_string_buffer(256)
    try:
        _load_mkl().MKL_Get_Version_String(buf, len(buf))
    except (ConfigError, AttributeError):
        return "oneMKL"
    text = buf.value.decode(errors="replace")  # "Intel(R) oneAPI Math Kernel Library Version 2026.2-..."
    return "oneMKL " + text.split("Version", 1)[-1].split()[0].replace("-Product", "") if "Version" in text else text


def load(lib: str) -> None:
    """Load ``lib`` now (mkl: find, load and probe libmkl_rt) without NumPy; ConfigError
    naming the fix when it cannot run here. The CLI calls it before anything heavy loads."""
    if lib == "mkl":
        _load_mkl()


def available() -> list[str]:
    """The libraries that can run here: ``openblas`` always, ``mkl`` when libmkl_rt loads."""
    try:
        _load_mkl()
        return list(LIBRARIES)
    except ConfigError:
        return ["openblas"]


# ------------------------------------------------------------------------ the choice

def record_path() -> Path:
    """The per-machine measurement ``numgpt compile`` writes: beside the kernel cache."""
    from .threads import kernel_cache_dir

    return kernel_cache_dir() / RECORD_NAME


def _read_record() -> dict:
    try:
        with open(record_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def resolve(choice: str | None = None, source: str = "select()") -> tuple[str, str]:
    """``choice`` (None: ``NUMGPT_GEMM``, else "auto") -> (library, why), without loading NumPy
    or MKL. "auto" takes this CPU's recorded measurement, else the vendor rule. ``source``
    names where an explicit choice came from (the CLI passes "--gemm")."""
    if choice is None:
        choice, source = os.environ.get(ENV) or "auto", f"{ENV} (or --gemm)"
    if choice not in CHOICES:
        raise ConfigError(f"gemm {choice!r} (from {source}) is not a GEMM library; choose one of "
                          f"{', '.join(CHOICES)}")
    if choice != "auto":
        if choice == "mkl" and not _mkl_candidates():
            raise _mkl_missing(f"asked for by {source}, but libmkl_rt was not found in "
                               f"{Path(sys.prefix) / 'lib'} nor on the library path")
        return choice, f"asked for by {source}"
    have_mkl = bool(_mkl_candidates())
    cpu, entry = cpu_model(), _read_record().get(cpu_model())
    if isinstance(entry, dict) and entry.get("choice") in LIBRARIES \
            and (entry["choice"] == "openblas" or have_mkl):
        return entry["choice"], (f"auto: measured on this {cpu} by `numgpt compile` "
                                 f"({entry.get('summary', 'recorded')})")
    vendor = cpu_vendor()
    lib = "mkl" if vendor == "GenuineIntel" and have_mkl else "openblas"
    why = (f"auto: no measurement recorded for this {cpu} (`numgpt compile` measures); vendor "
           f"rule: {vendor}" + (" with MKL installed -> mkl" if lib == "mkl" else
                                " -> openblas" if vendor != "GenuineIntel" else
                                f" but MKL not installed ({MKL_FIX}) -> openblas"))
    return lib, why


def _openblas_pools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(internal_api="openblas")


def select(choice: str | None = None, source: str = "select()") -> str:
    """Make ``choice`` (a name from CHOICES; None: ``NUMGPT_GEMM`` or "auto") the library that
    ``mm`` runs on, and move the threads to it (see the header). Returns the library."""
    with _select_lock:  # the server's and the training workers' threads may all ask at once
        return _select(choice, source)


def _select(choice: str | None, source: str) -> str:
    global _active, _openblas_threads
    lib, why = resolve(choice, source)
    if lib == "mkl" and why.startswith("auto"):
        try:
            _load_mkl()
        except ConfigError as exc:  # auto never fails: it takes the library that works
            lib, why = "openblas", f"{why}; but mkl is not usable here ({exc}) -> openblas"
    pools = _openblas_pools()
    if lib == "mkl":
        mkl = _load_mkl()
        if _openblas_threads is None:
            _openblas_threads = max([p["num_threads"] for p in pools.info()] or [_threads()])
        mkl.MKL_Set_Num_Threads(_openblas_threads)
        pools.limit(limits=1)
    elif _openblas_threads is not None:  # back from mkl: OpenBLAS gets its threads again
        pools.limit(limits=_openblas_threads)
        _openblas_threads = None
    _active = (lib, why)
    return lib


def deselect() -> None:
    """Forget the choice: the next product resolves it again (``NUMGPT_GEMM``, else auto).
    The CLI calls it after setting ``NUMGPT_GEMM`` from ``--gemm``, for a process (a test,
    a program calling ``cli.main``) whose library was already chosen."""
    global _active
    _active = None


def current() -> str:
    """The library ``mm`` runs on (resolving "auto" on first use)."""
    if _active is None:
        select()
    return _active[0]


def _openblas_version() -> str:
    import numpy as np

    info = [p for p in _openblas_pools().info()]
    if info:
        return f"OpenBLAS {info[0].get('version') or ''}".strip()
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', 'unknown BLAS')} {blas.get('version', '')}".strip()


def _threads_now(lib: str) -> int:
    if lib == "mkl":
        return int(_load_mkl().MKL_Get_Max_Threads())
    return max([p["num_threads"] for p in _openblas_pools().info()] or [1])


def describe() -> str:
    """One line: the library, its version and threads, why it was chosen, and which kernel
    runs a decode step's rows."""
    lib = current()
    version = _mkl_version() if lib == "mkl" else _openblas_version()
    return (f"{lib} ({version}, {_threads_now(lib)} threads; NumPy's OpenBLAS runs the small "
            f"products at {_threads_now('openblas')}): {_active[1]}; decode rows: "
            f"{decode_rows_text()}")


def decode_rows_text() -> str:
    """``DECODE_ROWS`` as one phrase: which kernel runs for which row count."""
    return "; ".join(f"{lo} row -> {kernel}" if lo == hi == 1 else f"{lo}-{hi} rows -> {kernel}"
                     for lo, hi, kernel, _ in DECODE_ROWS)


# ------------------------------------------------------------------------ the product

def _layout(x) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) that reads the 2-D ``x`` in place: rows
    evenly spaced with contiguous elements (NoTrans), or the transpose of such a matrix
    (Trans); None when neither (mm copies then). A length-1 axis may have any stride."""
    it = x.itemsize
    r, c = x.shape
    s0, s1 = x.strides
    n0 = s0 if r > 1 else c * it  # a single row: any stride reads as packed
    n1 = s1 if c > 1 else it
    if n1 == it and n0 >= max(c, 1) * it and n0 % it == 0:
        return _CBLAS_NO_TRANS, n0 // it
    t0 = s0 if r > 1 else it
    t1 = s1 if c > 1 else r * it
    if t0 == it and t1 >= max(r, 1) * it and t1 % it == 0:
        return _CBLAS_TRANS, t1 // it
    return None


def mm(a, b, out=None):
    """``a @ b``: a (m, k), b (k, n) -> (m, n), on the selected library. float32 and float64
    (the same dtype on both sides) go to MKL's sgemm/dgemm when mkl is selected; anything else
    (other dtypes, empty or broadcast operands) is NumPy's ``matmul``. ``out``, when given, must
    be a C-contiguous (m, n) array of that dtype, as for ``numpy.matmul``."""
    import numpy as np

    if (_active or (current(),))[0] != "mkl":
        if ROW_BY_ROW[0] <= a.shape[0] <= ROW_BY_ROW[1] and a.ndim == 2 and b.ndim == 2 \
                and a.shape[1] == b.shape[0] and out is None:
            return _row_by_row(a, b)
        return np.matmul(a, b, out=out)
    if a.ndim != 2 or b.ndim != 2 \
            or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64) \
            or 0 in a.shape or 0 in b.shape or a.shape[1] != b.shape[0] \
            or not (a.flags.aligned and b.flags.aligned):
        return np.matmul(a, b, out=out)
    m, k = a.shape
    n = b.shape[1]
    la, lb = _layout(a), _layout(b)
    if la is None:
        a = np.ascontiguousarray(a)
        la = (_CBLAS_NO_TRANS, k)
    if lb is None:
        b = np.ascontiguousarray(b)
        lb = (_CBLAS_NO_TRANS, n)
    target = out
    if out is None or out.shape != (m, n) or out.dtype != a.dtype \
            or not out.flags.c_contiguous or np.may_share_memory(out, a) \
            or np.may_share_memory(out, b):
        if out is not None and (out.shape != (m, n) or out.dtype != a.dtype):
            return np.matmul(a, b, out=out)  # NumPy's own message for a wrong out
        target = np.empty((m, n), a.dtype)
    gemm = _mkl.cblas_sgemm if a.dtype == np.float32 else _mkl.cblas_dgemm
    gemm(_CBLAS_ROW_MAJOR, la[0], lb[0], m, n, k, 1.0, a.ctypes.data, la[1],
         b.ctypes.data, lb[1], 0.0, target.ctypes.data, n)
    if out is not None and target is not out:
        out[...] = target
        return out
    return target


def _row_by_row(a, b):
    """``a @ b`` for a (m, k) with m in ROW_BY_ROW, b (k, n): one GEMV per row of a."""
    import numpy as np

    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    for i in range(a.shape[0]):
        np.matmul(a[i], b, out=out[i])  # (k,) @ (k, n) -> (n,)
    return out


# ------------------------------------------------------------------------ the measurement

# numgpt's products (m, k, n), float32: training (B*T rows of 124M's layers at the default
# batch, and the small recipe's), a 16-slot and a 1-row decode step, the tied head.
SHAPES = {
    "training": [(512, 768, 2304), (512, 768, 768), (512, 768, 3072), (512, 3072, 768),
                 (768, 128, 384), (512, 768, 128)],
    "decode 16 rows": [(16, 768, 2304), (16, 768, 768), (16, 768, 3072), (16, 3072, 768)],
    "decode 1 row": [(1, 768, 2304), (1, 768, 768), (1, 768, 3072), (1, 3072, 768)],
    "head": [(1, 768, 50257), (16, 768, 50257)],
}


def product_gflops(m: int, k: int, n: int, batch_seconds: float, repeats: int = 3,
                   product=None) -> float:
    """GFLOP/s of ``product(a, b, out)`` (default: ``mm``) at (m, k) @ (k, n), float32: the
    best of ``repeats`` timed batches of about ``batch_seconds`` each. ``numgpt compile`` and
    benchmarks/bench_gemm.py time every library (and bench_gemm its candidate kernel) with it."""
    import numpy as np

    product = mm if product is None else product
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    product(a, b, out)
    t0 = time.perf_counter()
    product(a, b, out)
    reps = max(1, int(batch_seconds / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            product(a, b, out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * m * k * n / best / 1e9


def measure_here(lib: str, seconds: float = 0.05) -> dict[str, list[float]]:
    """GFLOP/s of ``lib`` at every shape of SHAPES, in this process: group -> [rates]."""
    select(lib)
    return {group: [product_gflops(*s, seconds / 3) for s in shapes] for group, shapes in SHAPES.items()}


def measure(seconds: float = 0.03, rounds: int = 2) -> dict[str, dict[str, list[float]]]:
    """Each available library timed at SHAPES in a process of its own (two libraries' thread
    pools in one process starve each other), the libraries taking turns for ``rounds`` rounds
    and the best rate per shape kept (so a burst of load from another process during one
    library's turn does not decide the choice): library -> group -> GFLOP/s per shape."""
    results: dict[str, dict[str, list[float]]] = {}
    for lib in available() * rounds:
        code = ("import json, sys; from numgpt.core import gemm; "
                f"print(json.dumps(gemm.measure_here({lib!r}, {seconds!r})))")
        here = str(Path(__file__).resolve().parents[2])  # the folder holding this numgpt
        path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, ENV: lib, "PYTHONPATH": path}, check=True)
        rates = json.loads(run.stdout.strip().splitlines()[-1])
        best = results.setdefault(lib, rates)
        for group, values in rates.items():
            best[group] = [round(max(a, b), 1) for a, b in zip(best[group], values)]
    return results


def _geomean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def record_measurement(results: dict[str, dict[str, list[float]]],
                       threads: int | None = None) -> tuple[dict, str, str]:
    """Choose from ``measure()``'s figures: mkl when its geometric-mean speed over every shape
    is at least ``MKL_MARGIN`` times OpenBLAS's. ``threads``: how many threads the figures were
    measured with (default: this process's). Returns (the record with this CPU's entry
    replaced and other CPUs' kept, the choice, a summary); the caller writes it to
    ``record_path()`` (atomically, with io.files.atomic_write: io is above core)."""
    threads = _threads() if threads is None else threads
    ratio = None
    if "mkl" in results:
        ratio = _geomean([m / o for g in SHAPES for m, o in zip(results["mkl"][g], results["openblas"][g])])
    choice = "mkl" if ratio is not None and ratio >= MKL_MARGIN else "openblas"
    summary = ("mkl not installed" if ratio is None else
               f"mkl/openblas speed {ratio:.2f}x, geometric mean over {sum(map(len, SHAPES.values()))} "
               f"shapes at {threads} thread{'s' if threads != 1 else ''}")
    record = _read_record()
    record[cpu_model()] = {"choice": choice, "summary": summary, "threads": threads,
                           "gflops": results, "shapes": SHAPES}
    return record, choice, summary
