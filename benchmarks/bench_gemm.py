"""The GEMM libraries side by side at numgpt's shapes: NumPy's OpenBLAS and oneMKL (issue 19),
and the decode step's row counts (issue 18: which kernel should multiply 1 to 64 rows).

Each library runs in a process of its own (two libraries' thread pools in one process starve
each other), at each thread count, through ``numgpt.core.gemm.mm`` (what ``ops.linear`` and
the tied head call), float32; a rate is the best of ``--repeats`` timed batches. Groups:
training (124M's layers at 512 rows and the small recipe's), 16-row and 1-row decode steps,
the tied head, and with ``--rows`` every row count 1, 2, 4, ..., 64 at the block shapes and
the head, beside the candidate rows kernel (``numba-rows``: the issue-18 design as a plain
numba loop, which numgpt does not use; it runs here so its verdict can be re-checked on any
CPU). Prints the CPU, each library's version and threads, GFLOP/s and the ratios to
openblas; the library ``numgpt compile`` would record for ``--gemm auto`` is the one with the
better geometric mean over the compile's shapes (``gemm.record_measurement``).

    python benchmarks/bench_gemm.py [--threads 1,2] [--rows] [--repeats 5] [--quick]

Writes ``docs/results/bench_gemm.md`` as this CPU's section (other CPUs' sections stay);
``--quick`` (fewer shapes, short timings) writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(REPO, "docs", "results", "bench_gemm.md")

ROWS = (1, 2, 4, 8, 16, 32, 64)
BLOCK_SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))  # (in, out) of 124M's layers
HEAD = (768, 50257)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and every core this process may use)")
    p.add_argument("--rows", action="store_true",
                   help="also every decode row count 1..64 at the block shapes and the head")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per shape; the best counts")
    p.add_argument("--quick", action="store_true", help="fewer shapes, short timings; writes nothing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one library, one process
    return p.parse_args(argv)


def _shapes(args) -> dict[str, list[tuple[int, int, int]]]:
    from numgpt.core import gemm

    if args.quick:
        groups = {g: s[:2] for g, s in gemm.SHAPES.items()}
    else:
        groups = dict(gemm.SHAPES)
    if args.rows:
        for k, n in BLOCK_SHAPES + (HEAD,):
            groups[f"rows {k}x{n}"] = [(m, k, n) for m in (ROWS[::3] if args.quick else ROWS)]
    return groups


NUMBA_ROWS = "numba-rows"  # the candidate rows kernel (not part of numgpt: it lost; see gemm.DECODE_ROWS)


def _numba_rows_kernel():
    """out (M, N) = x (M, K) @ w (K, N): threads split the output columns in blocks of 256;
    each row of a block of w is copied once to a contiguous buffer and applied to every row
    of x, with the (M, 256) sums in a local array (so the compiler may vectorise over columns:
    a local array cannot alias w or out). The issue-18 design, as a plain numba loop."""
    import numpy as np
    from numba import njit, prange

    cb = 256

    @njit(parallel=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def rows_mm(x, w, out):
        M, K = x.shape
        N = w.shape[1]
        for bi in prange((N + cb - 1) // cb):
            c0 = bi * cb
            width = min(cb, N - c0)
            acc = np.zeros((M, cb), np.float32)
            wb = np.zeros(cb, np.float32)
            for k in range(K):
                for c in range(width):
                    wb[c] = w[k, c0 + c]
                for m in range(M):
                    xv = x[m, k]
                    for c in range(cb):
                        acc[m, c] += xv * wb[c]
            for m in range(M):
                for c in range(width):
                    out[m, c0 + c] = acc[m, c]
    return rows_mm


def _child(args) -> int:
    """Time one library at every shape; print one JSON line."""
    threads = int(args.threads)
    sys.path.insert(0, REPO)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(threads, warn=False)  # before NumPy loads
    import numpy as np

    from numgpt.core import gemm

    gemm.select("openblas" if args.child == NUMBA_ROWS else args.child)
    mm = _numba_rows_kernel() if args.child == NUMBA_ROWS else gemm.mm  # mm(a, b, out)
    if args.child == NUMBA_ROWS:
        x = np.random.default_rng(1).standard_normal((5, 300), dtype=np.float32)
        w = np.random.default_rng(2).standard_normal((300, 700), dtype=np.float32)
        got = np.empty((5, 700), np.float32)
        mm(x, w, got)
        assert np.allclose(got, x @ w, rtol=1e-4, atol=1e-3), "the numba rows kernel is wrong"
    budget = 0.01 if args.quick else 0.05  # seconds per timed batch
    rates = {}
    for group, shapes in _shapes(args).items():
        if args.child == NUMBA_ROWS and not group.startswith(("rows", "decode")):
            continue  # a candidate for the decode step's rows only
        rates[group] = [gemm.product_gflops(m, k, n, budget, args.repeats, mm) for m, k, n in shapes]
    describe = (f"{NUMBA_ROWS} (numba, {threads} threads; benchmarks/bench_gemm.py's candidate)"
                if args.child == NUMBA_ROWS else gemm.describe())
    print(json.dumps({"describe": describe, "rates": rates}))
    return 0


def _run_child(lib: str, threads: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--threads", str(threads),
           "--repeats", str(args.repeats)] + (["--quick"] if args.quick else []) + \
        (["--rows"] if args.rows else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        return _child(args)
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    from machine import write_cpu_section

    from numgpt.core import gemm

    cores = len(os.sched_getaffinity(0))
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    libs = gemm.available()
    cpu = gemm.cpu_model()
    lines = [f"CPU: {cpu} ({gemm.cpu_vendor()}), {cores} cores this process may use; "
             f"libraries here: {', '.join(libs)}"
             + ("" if "mkl" in libs else " (oneMKL not installed: pip install 'numgpt[mkl]')"), ""]
    shapes = _shapes(args)
    timed = libs + ([NUMBA_ROWS] if args.rows else [])
    ratios = [lib for lib in timed if lib != "openblas"]
    summary = []
    for t in threads:
        runs = {lib: _run_child(lib, t, args) for lib in timed}
        plural = "s" if t > 1 else ""
        for lib in timed:
            lines.append(f"- {t} thread{plural}, {runs[lib]['describe'].split(': ')[0]}")
        lines += ["", f"### {t} thread{plural}: GFLOP/s, float32, (m x k) @ (k x n)", "",
                  "| group | m x k x n | " + " | ".join(timed) + " | "
                  + "".join(f"{lib} / openblas | " for lib in ratios),
                  "|---|---|" + "---|" * (len(timed) + len(ratios))]
        for group, group_shapes in shapes.items():
            for i, (m, k, n) in enumerate(group_shapes):
                rates = {lib: runs[lib]["rates"][group][i] for lib in timed if group in runs[lib]["rates"]}
                lines.append(f"| {group} | {m} x {k} x {n} | "
                             + " | ".join(f"{rates[lib]:.1f}" if lib in rates else "-" for lib in timed)
                             + " | " + "".join(f"{rates[lib] / rates['openblas']:.2f}x | " if lib in rates
                                               else "- | " for lib in ratios))
        if "mkl" in libs:
            _, choice, why = gemm.record_measurement(
                {lib: {g: runs[lib]["rates"][g] for g in gemm.SHAPES} for lib in libs}, threads=t) \
                if not args.quick else (None, None, "not computed in --quick (fewer shapes)")
            summary.append(f"- {t} thread{plural}: --gemm auto would record {choice} ({why})"
                           if choice else f"- {t} thread{plural}: {why}")
        if args.rows:
            for k, n in BLOCK_SHAPES + (HEAD,):
                g = f"rows {k}x{n}"
                fastest = [max(timed, key=lambda lib: runs[lib]["rates"][g][i]) for i in range(len(shapes[g]))]
                summary.append(f"- {t} thread{plural}, {k} x {n}: fastest per row count "
                               + ", ".join(f"{m}: {f}" for (m, _, _), f in zip(shapes[g], fastest)))
        lines.append("")
    lines += ["### Summary", ""] + (summary or ["- one library here: nothing to compare"])
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_cpu_section(RESULTS, "GEMM libraries at numgpt's shapes",
                          __doc__.split("\n\n")[0] + " Written by `python benchmarks/bench_gemm.py "
                          "--rows`; each CPU's section is its own run.", cpu, text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
