"""Prompt prefill: a 512-token prompt through GPT-2 124M (float32), numgpt against llama.cpp.

numgpt builds a random-weight GPT-2 (``bench_llamacpp.build``, the real GPT-2 tokenizer so
llama.cpp can load the file), writes it as an f32 GGUF with its own writer, loads that GGUF
back, and times ``forward_cached`` over the prompt into a fresh KV cache (last-position
logits, what generation needs) on the fast path and on the reference path. llama.cpp's side
is ``llama-bench -p N -n 0`` (its prompt-processing test) on the same file. The sides
alternate for ``--repeats`` rounds; medians. Also printed: the machine (``machine.py``) and
numgpt's prefill FLOP rate as a share of the measured GEMM peak.

llama.cpp is not a dependency: ``--llama-bin DIR`` names the folder holding ``llama-bench``
(default: the folder of ``llama-bench`` on PATH); without it the llama.cpp column is skipped with the reason.
Target (issue 11): numgpt at least as fast as llama.cpp f32.

    python benchmarks/bench_prefill.py [--llama-bin DIR] [--threads N] [--tokens 512] [--quick]

Writes this CPU's section of ``docs/results/bench_prefill.md`` (``machine.write_cpu_section``:
another CPU's section stays; ``--quick``: a small model and 64 tokens, writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
RESULTS = os.path.join(REPO, "docs", "results", "bench_prefill.md")
INTRO = ("One section per CPU measured (a result on one vendor says little about the other); "
         "`python benchmarks/bench_prefill.py` on a CPU replaces only that CPU's section.")


def _on_path(binary: str) -> str | None:
    """The folder holding ``binary`` on PATH (None: the llama.cpp column is skipped)."""
    import shutil

    found = shutil.which(binary)
    return os.path.dirname(found) if found else None


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bin", default=_on_path("llama-bench"), help="folder holding llama-bench")
    p.add_argument("--tokenizer", default=os.path.join(REPO, "..", "shared", "data", "gpt2"),
                   help="folder with GPT-2 vocab.json + merges.txt")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=512, help="prompt length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small model, 64 tokens, 1 round; writes nothing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens = 1, 64
    elif args.out is None:
        args.out = RESULTS
    return args


def llama_prefill(bench: str, gguf: str, n: int, threads: int) -> float:
    """llama-bench's prompt-processing rate (tokens/s) for an n-token prompt, one repetition."""
    done = subprocess.run([bench, "-m", gguf, "-p", str(n), "-n", "0", "-t", str(threads),
                           "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    return float(next(r for r in rows if r.get("n_prompt", 0) > 0)["avg_ts"])


def numgpt_prefill(model, prompt) -> float:
    """Tokens/s of one prefill of ``prompt`` (1, T) into a fresh cache."""
    cache = model.new_cache(1, prompt.shape[1])
    t0 = time.perf_counter()
    model.forward_cached(prompt, cache)
    return prompt.shape[1] / (time.perf_counter() - t0)


def prefill_flops(T: int, L: int, C: int, V: int) -> float:
    """2 x multiply-adds: 12 C^2 weights per layer per token, causal attention, one head row."""
    return 2.0 * T * L * 12 * C * C + L * 2.0 * T * T * C + 2.0 * C * V


def main(argv=None) -> int:
    args = _parse(argv)
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)  # before NumPy loads
    import numpy as np

    import numgpt
    from bench_llamacpp import SHAPES, build
    from machine import Machine, write_cpu_section
    from numgpt.io.gguf import write_gguf

    machine = Machine.measure(args.threads, quick=args.quick)
    print(machine.describe(), flush=True)
    bench = os.path.join(args.llama_bin or "", "llama-bench")
    skip = None if args.llama_bin and os.access(bench, os.X_OK) else \
        f"no executable llama-bench in {args.llama_bin or 'PATH (pass --llama-bin DIR)'}"
    if not os.path.isdir(args.tokenizer):
        sys.exit(f"GPT-2 tokenizer folder {args.tokenizer} not found (give --tokenizer)")
    shape = SHAPES["quick" if args.quick else "124M"]
    model = build(shape, args.tokenizer)
    prompt = np.random.default_rng(0).integers(0, 50257, (1, args.tokens))
    rates = {"numgpt fast": [], "numgpt reference": [], "llama.cpp f32": []}
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_gguf(model, os.path.join(folder, "model-f32.gguf"), "f32"))
        ours = numgpt.load(path)
        for kernels in ("fast", "reference"):  # warm-up: the first calls compile (or load) kernels
            ours.set_kernels(kernels)
            numgpt_prefill(ours, prompt)
        for _ in range(args.repeats):
            for kernels in ("fast", "reference"):
                ours.set_kernels(kernels)
                rates[f"numgpt {kernels}"].append(numgpt_prefill(ours, prompt))
            if skip is None:
                rates["llama.cpp f32"].append(llama_prefill(bench, path, args.tokens, args.threads))
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    flops = prefill_flops(args.tokens, shape["n_layer"], shape["n_embd"], 50257)
    title = f"Prefill of a {args.tokens}-token prompt, float32: numgpt vs llama.cpp"
    lines = [f"Written by `benchmarks/bench_prefill.py` ({'quick run, ' if args.quick else ''}"
             f"shape {shape}, median of {args.repeats} alternated rounds; {machine.describe()}).", "",
             "| implementation | tokens/s | share of the GEMM peak | llama.cpp / it |", "|---|---|---|---|"]
    for name, rate in med.items():
        share = flops * rate / args.tokens / 1e9 / machine.gemm_gflops
        vs = f"{med['llama.cpp f32'] / rate:.2f}x" if "llama.cpp f32" in med else "-"
        lines.append(f"| {name} | {rate:.1f} | {share:.0%} | {vs} |")
    if skip:
        lines += ["", f"llama.cpp column skipped: {skip}."]
    elif "llama.cpp f32" in med:
        ok = med["numgpt fast"] >= med["llama.cpp f32"]
        lines += ["", f"Target numgpt fast >= llama.cpp f32: {'met' if ok else 'NOT met'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:  # this CPU's section; the other CPUs' sections stay
        write_cpu_section(args.out, title, INTRO, machine.cpu, text)
        print(f"wrote {os.path.relpath(args.out)} (section {machine.cpu!r})")
    else:
        print("--quick: nothing written" if args.quick else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
