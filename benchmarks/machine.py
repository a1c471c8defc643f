"""What every benchmark prints about the machine it ran on, measured in the same run.

The machines this project runs on change between sessions, so an absolute time means little:
each benchmark reports the CPU model, the thread counts, the measured float32 GEMM peak (the
best NumPy ``matmul`` rate of square matrices) and the measured memory read bandwidth, and
states its results as ratios against them and against its counterpart.

The read bandwidth is the ceiling of decoding (every weight read once per token), so it is
measured the way decoding reads: with every thread, by a loop that waits on memory and not
on arithmetic. One thread's ``x.sum()`` is neither (issue 19: on a 2-vCPU Xeon it read 7.6 GB/s while two
threads read about 25 GB/s, and numgpt's own decode streamed faster than that "ceiling").
``read_sweep`` splits a float32 array far larger than the caches into one contiguous chunk
per thread and sums each with a compiled ``fastmath`` loop (so the compiler keeps several
vector accumulators in flight and the loop waits on memory); the best of several sweeps
counts. ``check_streaming`` compares it with the rate a decode actually streams its weights.

    from machine import Machine
    m = Machine.measure(threads=2, quick=args.quick)
    print(m.describe())
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def gemm_peak(n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of the best of ``repeats`` float32 (n, n) @ (n, n) products in NumPy (its BLAS,
    with the thread count BLAS was loaded with)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)  # warm-up: BLAS threads started, pages touched
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def gemm_library() -> str:
    """The library numgpt's matrix products run on, as every benchmark prints it:
    ``numgpt.core.gemm.describe()`` where that module exists (the GEMM library is a choice,
    issue 19), else NumPy's BLAS (what ``ops.linear``'s ``@`` called before the choice)."""
    try:
        from numgpt.core import gemm
        return gemm.describe()
    except (ImportError, AttributeError):
        import numpy as np

        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        return f"NumPy's BLAS ({blas.get('name', 'unknown')} {blas.get('version', '')})".replace(" )", ")")


_CHUNK_SUM = None


def _chunk_sum():
    """The compiled loop: the sum of a contiguous float32 chunk (n,), read once."""
    global _CHUNK_SUM
    if _CHUNK_SUM is None:
        import numpy as np
        from numba import njit

        @njit(fastmath=True, nogil=True)
        def chunk_sum(x):
            s = np.float32(0.0)
            for i in range(x.shape[0]):  # from 0 (no negative-index wraparound): plain vector loads
                s += x[i]  # fastmath: reassociated into several vector accumulators
            return s
        _CHUNK_SUM = chunk_sum
    return _CHUNK_SUM


def read_sweep(mib: int = 512, threads: int = 1, x=None):
    """A timer: each call reads a ``mib`` MiB float32 array once, one contiguous chunk per
    thread (``threads`` Python threads running the compiled loop without the GIL), and returns
    the GB/s of that sweep. Python threads rather than a numba ``prange``: on a shared 2-vCPU
    EPYC the prange sweep (numba's OpenMP layer) read 6 to 22 GB/s, depending on
    GOMP_SPINCOUNT, where the same loop on two Python threads read 24 to 33; this figure
    must not depend on a thread pool's settings."""
    import threading

    import numpy as np

    if x is None:  # (a caller may pass its own 1-D float32 array of ones)
        x = np.ones(mib * (1 << 20) // 4, np.float32)  # pages touched
    n, threads = x.size, max(1, threads)
    chunks = [x[c * n // threads:(c + 1) * n // threads] for c in range(threads)]
    chunk_sum = _chunk_sum()
    assert sum(float(chunk_sum(c)) for c in chunks) == n  # compiled; every element read once

    def timer() -> float:
        # threads started per sweep (about 0.1 ms) and joined: nothing left running after it
        workers = [threading.Thread(target=chunk_sum, args=(c,)) for c in chunks]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return x.nbytes / (time.perf_counter() - t0) / 1e9
    return timer


def read_bandwidth(mib: int = 512, repeats: int = 5, threads: int = 1) -> float:
    """GB/s: the best of ``repeats`` sweeps (``read_sweep``) of a ``mib`` MiB array on
    ``threads`` threads (benchmarks pass their thread count: every core by default)."""
    timer = read_sweep(mib, threads)
    return max(timer() for _ in range(repeats))


def one_thread_sum_bandwidth(mib: int = 512, repeats: int = 3) -> float:
    """GB/s of the best of ``repeats`` NumPy ``x.sum()`` (one thread, pairwise summation):
    what this module measured before; printed beside ``read_bandwidth`` for comparison."""
    import numpy as np

    x = np.ones(mib * (1 << 20) // 4, np.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def check_streaming(name: str, bytes_per_token: float, tokens_per_s: float,
                    bandwidth_gbs: float) -> str:
    """One line: the rate a decode streams its weights (bytes per token x tokens/s) beside the
    measured read bandwidth; a WARNING when it streams faster, which means the ceiling was
    measured too low (a decode cannot read memory faster than memory can be read)."""
    rate = bytes_per_token * tokens_per_s / 1e9
    line = (f"{name}: decode streams {rate:.1f} GB/s of weights ({bytes_per_token / 1e6:.0f} MB/token "
            f"x {tokens_per_s:.1f} tok/s) = {rate / bandwidth_gbs:.0%} of the measured read "
            f"bandwidth {bandwidth_gbs:.1f} GB/s")
    if rate > bandwidth_gbs:
        line = "WARNING: " + line + "; faster than the ceiling: the bandwidth is under-measured"
    return line


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    gemm_gflops: float
    bandwidth_gbs: float
    load: float
    one_thread_sum_gbs: float = float("nan")
    gemm: str = ""

    @classmethod
    def measure(cls, threads: int, quick: bool = False) -> "Machine":
        """Measure now (quick: smaller matrices and arrays, a rough figure in a second)."""
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        mib = 256 if quick else 1024  # far above the last-level cache either way
        return cls(cpu_model(), os.cpu_count() or 1, threads,
                   gemm_peak(1024 if quick else 2048), read_bandwidth(mib, threads=threads), load,
                   one_thread_sum_bandwidth(mib, repeats=2 if quick else 3), gemm_library())

    def describe(self) -> str:
        return (f"CPU {self.cpu}, {self.cores} cores visible, {self.threads} thread(s) per side; "
                f"GEMM library {self.gemm or gemm_library()}; measured float32 GEMM peak "
                f"{self.gemm_gflops:.0f} GFLOP/s, memory read bandwidth {self.bandwidth_gbs:.1f} GB/s "
                f"({self.threads}-thread sweep; one thread's numpy sum reads {self.one_thread_sum_gbs:.1f}); load average "
                f"{self.load:.1f} at the start (above the core count means other processes "
                f"shared the CPUs)")


def main(argv=None) -> int:
    """``python benchmarks/machine.py [--threads N] [--quick]``: print what benchmarks print."""
    import argparse

    p = argparse.ArgumentParser(description="Measure this machine's GEMM peak and read bandwidth.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="smaller matrices and arrays")
    args = p.parse_args(argv)
    print(Machine.measure(args.threads, quick=args.quick).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def write_cpu_section(path: str, title: str, intro: str, cpu: str, body: str) -> str:
    """Write ``body`` as the section of ``cpu`` in the results file ``path`` and keep every
    other CPU's section as it is (a result on one vendor says little about the other, so
    a run on an Intel Xeon must not erase the AMD EPYC's figures, nor the other way round).
    Sections are ``## CPU`` headings, sorted; returns the text written (atomically)."""
    from numgpt.io.files import atomic_write

    sections: dict[str, str] = {}
    if os.path.exists(path):
        current = None
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("## "):
                    current = line[3:].strip()
                    sections[current] = ""
                elif current is not None:
                    sections[current] += line
    sections[cpu] = "\n" + body.strip("\n") + "\n\n"
    text = f"# {title}\n\n{intro.strip()}\n\n" + "".join(
        f"## {name}\n{sections[name]}" for name in sorted(sections))
    atomic_write(path, text.rstrip("\n") + "\n")
    return text
