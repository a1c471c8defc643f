"""What the hook points cost: the forward pass with and without them, side by side.

A model with no hook set runs ``forward_cached``'s fused path, which tests/test_hooks.py
proves never enters the hook code. This script measures it against the same method of the
model class as it was before hook points existed (``numgpt/core/model.py`` at ``--before``,
read with ``git show`` and run on the same weights, so only the model code differs), and
shows what reading activations costs when hooks are set:

* ``forward_cached`` with no hooks, this checkout, and the same at ``--before``;
* one reading hook (``blocks.0.hook_resid_post``): the hooked pass, fused attention kept;
* ``run_with_cache`` of every point: unfused attention in every layer, LayerNorm from the
  normalized array, a copy of every activation.

Each call is a prompt pass of ``--tokens`` tokens (B=1) from an empty cache; the calls are
interleaved round-robin so a noisy neighbour slows all of them alike; the table gives the
median and the ratio to the ``--before`` median. Prints the machine line.

    python benchmarks/bench_hooks.py [--tokens 128] [--repeats 7] [--quick]

Prints the table and writes it to ``docs/results/bench_hooks.md`` as this CPU's section
(other CPUs' sections stay); ``--quick`` writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(REPO, "docs", "results", "bench_hooks.md")
BEFORE = "140e99f"  # the last commit before the hook points


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per row (default 7)")
    p.add_argument("--before", default=BEFORE, help=f"commit of the model code to compare (default {BEFORE})")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--quick", action="store_true", help="a 2-layer model, 3 repeats (a smoke run)")
    return p.parse_args(argv)


def _model_class_at(commit: str):
    """``GPT`` as ``numgpt/core/model.py`` defined it at ``commit`` (same package around it)."""
    src = subprocess.run(["git", "show", f"{commit}:numgpt/core/model.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType("numgpt.core._model_before")
    module.__package__ = "numgpt.core"
    exec(compile(src, f"numgpt/core/model.py@{commit}", "exec"), module.__dict__)
    return module.GPT


def main(argv=None) -> int:
    args = _parse(argv)
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)  # before NumPy loads
    import numpy as np

    from machine import Machine, write_cpu_section
    from numgpt.core.config import GPTConfig
    from numgpt.core.model import GPT

    shape = dict(n_layer=2, n_head=4, n_embd=128) if args.quick else dict(n_layer=12, n_head=12, n_embd=768)
    repeats = 3 if args.quick else args.repeats
    config = GPTConfig(**shape, vocab_size=50257, block_size=1024)
    model = GPT(config, seed=0)
    old = _model_class_at(args.before)(GPTConfig(**shape, vocab_size=50257, block_size=1024), seed=None)
    for name, p in old.parameters().items():
        p.data[...] = model.parameters()[name].data
    ids = np.random.default_rng(0).integers(0, 50257, size=(1, args.tokens))
    rows = {
        f"forward_cached, no hooks ({args.before}, before hook points)":
            lambda: old.forward_cached(ids, old.new_cache(1, args.tokens), all_logits=True),
        "forward_cached, no hooks (this checkout)":
            lambda: model.forward_cached(ids, model.new_cache(1, args.tokens), all_logits=True),
        "one reading hook (blocks.0.hook_resid_post; fused attention)":
            lambda: model.run_with_hooks(ids, [("blocks.0.hook_resid_post", lambda a, h: None)]),
        "run_with_cache, every point (unfused attention)":
            lambda: model.run_with_cache(ids),
    }
    first = next(iter(rows.values()))()
    assert np.array_equal(first, rows["forward_cached, no hooks (this checkout)"]())  # same weights, same result
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    machine = Machine.measure(threads=args.threads, quick=True)
    base = statistics.median(next(iter(times.values())))
    lines = [machine.describe(), "",
             f"{'x'.join(str(v) for v in shape.values())} (n_layer x n_head x n_embd), "
             f"{args.tokens}-token prompt pass, {repeats} calls each, interleaved", "",
             f"| {'call':<62} | median ms | vs before |", f"|{'-' * 64}|-----------|-----------|"]
    for name, ts in times.items():
        m = statistics.median(ts)
        lines.append(f"| {name:<62} | {1e3 * m:9.1f} | {m / base:8.2f}x |")
    print("\n".join(lines))
    if not args.quick:  # one section per CPU; another CPU's figures stay
        write_cpu_section(RESULTS, "What the hook points cost", __doc__.split("\n\n")[0] +
                          " Written by `python benchmarks/bench_hooks.py`.", machine.cpu,
                          "\n".join(lines))
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
