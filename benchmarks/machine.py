"""What every benchmark prints about the machine it ran on, measured in the same run.

The machines this project runs on change between sessions, so an absolute time means little:
each benchmark reports the CPU model, the thread counts, the measured float32 GEMM peak (the
best NumPy ``matmul`` rate of square matrices) and the measured memory read bandwidth (the
best rate of summing an array much larger than the caches), and states its results as
ratios against them and against its counterpart.

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


def read_bandwidth(mib: int = 512, repeats: int = 3) -> float:
    """GB/s of the best of ``repeats`` sums of a ``mib`` MiB float32 array (a read-only sweep,
    what decoding does with the weights)."""
    import numpy as np

    x = np.ones(mib * (1 << 20) // 4, np.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    gemm_gflops: float
    bandwidth_gbs: float
    load: float

    @classmethod
    def measure(cls, threads: int, quick: bool = False) -> "Machine":
        """Measure now (quick: smaller matrices and arrays, a rough figure in a second)."""
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        return cls(cpu_model(), os.cpu_count() or 1, threads,
                   gemm_peak(1024 if quick else 2048), read_bandwidth(64 if quick else 512), load)

    def describe(self) -> str:
        return (f"CPU {self.cpu}, {self.cores} cores visible, {self.threads} thread(s) per side; "
                f"measured float32 GEMM peak {self.gemm_gflops:.0f} GFLOP/s, memory read "
                f"bandwidth {self.bandwidth_gbs:.1f} GB/s; load average {self.load:.1f} at the "
                f"start (above the core count means other processes shared the CPUs)")
