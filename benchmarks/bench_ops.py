"""Per-op timing: every op of the op table, forward and backward, numgpt against torch.

The ops and their inputs come from the one op table (``numgpt/verify/op_cases.py``, each
entry's ``bench`` shapes), the same table the gradient gate and the PyTorch parity tests
read, so a row here is the op a reader finds there under the same name. Both libraries get
the same float32 arrays. Forward: one call that keeps what backward needs (torch with
``requires_grad``); backward: the op's backward on a fixed upstream gradient (torch's
``backward(retain_graph=True)`` of the same output). Each number is the median of
``--repeats`` calls in milliseconds, after one warm-up call. ``attention_inference`` has no
backward; ``dropout`` has no torch twin in the table (its parity test draws the same mask).

    python benchmarks/bench_ops.py [--threads 1] [--repeats 20] [--quick] [--out PATH]

Sizes: B=4, T=256, C=768, nh=12, V=50257 (GPT-2 small, one short batch); ``--quick`` uses
tiny sizes and 2 repeats and writes nothing unless ``--out`` is given. Prints the CPU
model and thread counts; a full run writes ``docs/results/bench_ops.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results", "bench_ops.md")
SIZES = {"B": 4, "T": 256, "C": 768, "nh": 12, "V": 50257}
QUICK_SIZES = {"B": 2, "T": 16, "C": 32, "nh": 4, "V": 97}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="threads for numpy's BLAS and torch (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per op and direction")
    p.add_argument("--ops", default="", help="comma-separated op names to time (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a smoke run")
    p.add_argument("--out", default=None, help=f"where the markdown goes (default {os.path.relpath(RESULTS)}; "
                                               "--quick writes nothing unless --out is given)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
    elif args.out is None:
        args.out = RESULTS
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch pages, BLAS buffers
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_entry(e, sizes: dict, repeats: int) -> dict:
    """ms per call of one table entry: numgpt and torch, forward and backward (None: none)."""
    import numpy as np
    import torch

    from numgpt.verify import op_cases as op_table

    case = op_table.OpCase(e, e.bench(sizes))
    inputs = case.inputs(np.random.default_rng(0), np.float32)
    row = {"op": e.name, "shapes": ", ".join(str(None if x is None else x.shape) for x in inputs)}
    out, backward = op_table.call(e, inputs, case.consts())
    row["np_fwd"] = _median_ms(lambda: op_table.call(e, inputs, case.consts()), repeats)
    g = np.random.default_rng(1).standard_normal(np.shape(out)).astype(np.float32)
    row["np_bwd"] = _median_ms(lambda: backward(g), repeats) if backward is not None else None
    row["torch_fwd"] = row["torch_bwd"] = None
    if e.torch is not None:
        fn = op_table.torch_fn(e)
        tin = [None if x is None else torch.tensor(x, requires_grad=e.differentiable) for x in inputs]
        consts = case.consts()
        row["torch_fwd"] = _median_ms(lambda: fn(*tin, **consts), repeats)
        if e.differentiable:
            tout, tg = fn(*tin, **consts), torch.from_numpy(g)
            row["torch_bwd"] = _median_ms(lambda: tout.backward(tg, retain_graph=True), repeats)
    return row


def _fmt(ms) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| op | input shapes (float32) | numgpt fwd ms | torch fwd ms | fwd numgpt/torch "
             "| numgpt bwd ms | torch bwd ms | bwd numgpt/torch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shapes']} | {_fmt(r['np_fwd'])} | {_fmt(r['torch_fwd'])} | "
                     f"{_ratio(r['np_fwd'], r['torch_fwd'])} | {_fmt(r['np_bwd'])} | {_fmt(r['torch_bwd'])} | "
                     f"{_ratio(r['np_bwd'], r['torch_bwd'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = _parse(argv)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)  # before NumPy loads
    import numpy as np
    import torch

    from numgpt.verify import op_cases as op_table

    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    wanted = [n for n in args.ops.split(",") if n]
    entries = [op_table.entry(n) for n in wanted] if wanted else list(op_table.TABLE)
    header = (f"# Per-op timing: numgpt vs torch\n\nWritten by `benchmarks/bench_ops.py`"
              f"{' --quick' if args.quick else ''}. CPU: {_cpu_model()}; {args.threads} thread(s) for "
              f"numpy's BLAS and torch (torch reports {torch.get_num_threads()}); numpy {np.__version__}, "
              f"torch {torch.__version__}. Sizes {sizes}; median of {args.repeats} calls after one warm-up. "
              f"Ops and shapes from `numgpt/verify/op_cases.py` (each entry's `bench`).")
    print(header.split("\n\n", 1)[1], flush=True)
    rows = []
    for e in entries:
        rows.append(time_entry(e, sizes, args.repeats))
        r = rows[-1]
        print(f"{r['op']:>20}  fwd {_fmt(r['np_fwd']):>9} ms (torch {_fmt(r['torch_fwd'])})  "
              f"bwd {_fmt(r['np_bwd']):>9} ms (torch {_fmt(r['torch_bwd'])})", flush=True)
    text = format_table(rows, header)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
