"""124M forward speed and inference memory: numgpt against Hugging Face ``transformers``.

A subprocess builds a ``transformers.GPT2LMHeadModel`` with random weights on the GPT-2
small shape and saves it with ``save_pretrained`` to a temporary folder; numgpt loads that
folder with its importer (``numgpt.load``), so both libraries hold identical weights (the
script checks their logits agree before timing anything). For float32 and float64 (HF
``.double()``) it times one 1024-token forward (B=1) of:

* numgpt ``model.forward`` under ``no_grad``: logits for all 1024 positions (what HF returns);
* numgpt ``forward_cached`` prefill: the same layers through the KV-cache path, but logits
  for the last position only (what generation needs); shown separately, not in the ratios;
* transformers under ``torch.no_grad()``, eager attention and sdpa attention (all logits).

Every implementation gets one warm-up call, then the calls are interleaved round-robin so
a noisy neighbour slows all of them alike. The table gives the median wall time, the
minimum, and the median user and system CPU time of the process (summed over its
threads): user CPU is the computation, which other processes on a shared machine disturb
less; system CPU is mostly the kernel mapping fresh memory (the (1, T, 50257) logits).
numpy's OpenBLAS and torch run with the same thread count, set and read back at run time
for each count in ``--threads`` (default: 1, then every core).

Peak memory of a 124M float32 inference process is measured in fresh subprocesses, started
before this process imports anything heavy, that import numgpt only, load the saved
``model.safetensors`` with ``numgpt.load`` and run one 1024-token forward:
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (and the kernel's VmHWM as a cross-check).

numgpt runs the op path ``--kernels`` (default fast); "numgpt forward [reference]" is the same
model switched to the NumPy reference ops for the same call. For each thread count the run
also measures the float32 GEMM peak (``benchmarks/machine.py``) and reports the forward's
FLOP rate as a share of it (issue 11 target: >= 75% of the peak, and >= 1.2x sdpa).

    python benchmarks/bench_forward.py [--threads 1,2] [--repeats 3] [--quick]

Prints the tables and writes them as this CPU's section of ``docs/results/bench_forward.md``
(``machine.write_cpu_section``: another CPU's section stays). Targets (issue 3):
float32 at least 1.2x faster than transformers, float64 at least as fast, peak < 800 MB.
"""

from __future__ import annotations

import argparse
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results",
                       "bench_forward.md")
TARGETS = {"float32": 1.2, "float64": 1.0}  # transformers time / numgpt time, at least
MEMORY_TARGET_MB = 800
TITLE = "124M forward: numgpt vs transformers"
INTRO = ("One section per CPU measured (a result on one vendor says little about the other); "
         "`python benchmarks/bench_forward.py` on a CPU replaces only that CPU's section.")
HF_ATTENTION = ("eager", "sdpa")


def _parse(argv=None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=",".join(dict.fromkeys(["1", str(cores)])),
                   help="comma-separated thread counts for numpy's BLAS and torch, each timed "
                        f"(default: 1 and every core, here {cores})")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    p.add_argument("--tokens", type=int, default=1024, help="prompt length (<= 1024)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated dtypes to time")
    p.add_argument("--quick", action="store_true", help="1 repeat, 256 tokens (a smoke run)")
    p.add_argument("--kernels", choices=["fast", "reference"], default="fast",
                   help="numgpt's op path (default fast)")
    p.add_argument("--out", default=None,
                   help=f"where the markdown goes (default {os.path.relpath(RESULTS)}; --quick "
                        "writes nothing unless --out is given)")
    p.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--save-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = [int(n) for n in args.threads.split(",")]
    if not 1 <= args.tokens <= 1024:
        p.error(f"--tokens must be in [1, 1024] (GPT-2's context), got {args.tokens}")
    if args.quick:
        args.repeats, args.tokens = 1, 256
    elif args.out is None:
        args.out = RESULTS
    return args


# ------------------------------------------------------------------- subprocesses

def save_child(folder: str) -> None:
    """Save a random-weight GPT-2 124M (HF format, safetensors) to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)


def load_numgpt(folder: str, dtype: str):
    """``numgpt.load`` (the importer users run); if this checkout has none yet, copy the
    safetensors weights in by name (HF's Conv1D weights are (in, out) like numgpt's)."""
    import numgpt

    try:
        return numgpt.load(folder, dtype=dtype)
    except (AttributeError, ImportError):
        import json

        from safetensors.numpy import load_file

        from numgpt.core.model import GPT, GPTConfig

        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           layer_norm_epsilon=hf["layer_norm_epsilon"], dtype=dtype)
        model = GPT(config, seed=None)
        weights = {k.removeprefix("transformer."): v
                   for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
        for name, p in model.parameters().items():
            p.data[...] = weights.pop(name)
        return model


def memory_child(folder: str, mode: str, tokens: int) -> None:
    """Load the model with numgpt only, run one forward, print RSS figures in MB.

    mode "prefill": ``forward_cached`` (last position's logits, the generation path);
    mode "forward": ``model.forward`` under no_grad (all logits, (1, T, V)).
    """
    import resource

    import numpy as np

    from numgpt.core.tensor import no_grad

    def maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    def vmhwm_mb() -> float:  # the kernel's peak RSS of this address space, a cross-check
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024

    after_import = maxrss_mb()
    model = load_numgpt(folder, "float32")
    after_load = maxrss_mb()
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, tokens))
    if mode == "prefill":
        logits = model.forward_cached(idx, model.new_cache(1, tokens))
    else:
        with no_grad():
            logits = model(idx)[0].data
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    print(f"MEMORY {after_import:.1f} {after_load:.1f} {maxrss_mb():.1f} {vmhwm_mb():.1f}")


def _run_self(*flags: str) -> str:
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def measure_memory(folder: str, mode: str, tokens: int) -> tuple[float, ...]:
    """``memory_child`` in a fresh interpreter: (after import, after load, peak, VmHWM) MB.

    Call it while this process is still small: Linux carries ``ru_maxrss`` across exec, so
    a child started by a process that holds two 124M models would report their size.
    """
    out = _run_self("--tokens", str(tokens), "--memory-child", folder, mode)
    line = next(ln for ln in out.splitlines() if ln.startswith("MEMORY "))
    return tuple(float(x) for x in line.split()[1:])


# ----------------------------------------------------------------------- threads

def _openblas():
    """(get_num_threads, set_num_threads, get_config) of the OpenBLAS numpy loaded, or None."""
    import ctypes

    import numpy  # noqa: F401 - loads the library whose symbols we look up

    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            try:
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                cfg = getattr(lib, f"{prefix}_get_config{suffix}")
            except AttributeError:
                continue
            get.restype, cfg.restype = ctypes.c_int, ctypes.c_char_p
            return get, put, cfg
    return None


def set_threads(n: int) -> str:
    """Give numpy's OpenBLAS and torch ``n`` threads; return what each reports back."""
    import torch

    torch.set_num_threads(n)
    blas = _openblas()
    if blas is None:
        return f"numpy BLAS: not OpenBLAS, thread count not set; torch: {torch.get_num_threads()}"
    get, put, cfg = blas
    put(n)
    if get() != n or torch.get_num_threads() != n:
        raise SystemExit(f"asked for {n} threads, got OpenBLAS {get()} and torch {torch.get_num_threads()}")
    return f"numpy BLAS: {cfg().decode().strip()}, {get()} threads; torch: {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------- timing

def _hf_model(folder: str, attn: str, dtype: str):
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn)
    model = model.double() if dtype == "float64" else model.float()
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    return model.eval().requires_grad_(False)


def contestants(folder: str, dtype: str, idx) -> dict:
    """{label: (output description, zero-argument callable)} for one dtype."""
    import numpy as np
    import torch

    from numgpt.core.tensor import no_grad

    model = load_numgpt(folder, dtype)
    model.set_kernels(KERNELS)
    hf = {attn: _hf_model(folder, attn, dtype) for attn in HF_ATTENTION}
    ids = torch.from_numpy(idx)

    def numgpt_forward():
        with no_grad():
            return model(idx)[0].data  # (1, T, V)

    def numgpt_reference():
        model.set_kernels("reference")
        try:
            return numgpt_forward()
        finally:
            model.set_kernels(KERNELS)

    def numgpt_prefill():
        return model.forward_cached(idx, model.new_cache(1, idx.shape[1]))  # (1, V)

    def transformers_call(m):
        def run():
            with torch.no_grad():
                return m(ids).logits  # (1, T, V)
        return run

    # same weights, same logits: timing two different models would be meaningless
    ours = numgpt_forward()
    limit = 1e-3 if dtype == "float32" else 1e-8
    for attn, m in hf.items():
        diff = float(np.max(np.abs(ours - transformers_call(m)().numpy())))
        if not diff < limit:
            raise SystemExit(f"{dtype} logits of numgpt and transformers ({attn}) differ by {diff:.3g} "
                             f"(> {limit:g}): not the same model; not timing them")
        print(f"  {dtype}: logits max |numgpt - transformers {attn}| = {diff:.2e}")
    diff = float(np.max(np.abs(numgpt_prefill() - ours[:, -1])))
    assert diff < limit, f"prefill logits differ from the full forward by {diff:.3g}"
    calls = {"numgpt forward": ("all logits (1, T, V)", numgpt_forward),
             "numgpt forward [reference]": ("all logits (1, T, V)", numgpt_reference),
             "numgpt forward_cached prefill": ("last position only (1, V)", numgpt_prefill)}
    for attn, m in hf.items():
        calls[f"transformers {attn}"] = ("all logits (1, T, V)", transformers_call(m))
    return calls


def time_interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """One warm-up each, then ``repeats`` round-robin rounds; wall, user and system CPU seconds
    per call (CPU summed over all threads of the process)."""
    import gc
    import resource
    import statistics
    import time

    for _, fn in calls.values():
        fn()
    runs = {name: [] for name in calls}  # (wall, user, sys) seconds per call
    for _ in range(repeats):
        for name, (_, fn) in calls.items():
            gc.collect()
            r0, w = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            out = fn()
            w, r1 = time.perf_counter() - w, resource.getrusage(resource.RUSAGE_SELF)
            runs[name].append((w, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
            del out
    med = statistics.median
    return {name: {"median": med(r[0] for r in rs), "min": min(r[0] for r in rs),
                   "user": med(r[1] for r in rs), "sys": med(r[2] for r in rs)}
            for name, rs in runs.items()}


KERNELS = "fast"  # numgpt's op path, from --kernels


def forward_flops(T: int, L: int = 12, C: int = 768, V: int = 50257) -> float:
    """Multiply-adds x 2 of one causal forward of T tokens: the 12 C^2 weights of each layer
    per token, the tied head, and causal attention (Q K^T and P V over T^2 / 2 pairs)."""
    return 2.0 * T * (L * 12 * C * C + C * V) + L * 2.0 * T * T * C


def run_timings(args, folder: str) -> tuple[dict, list[str]]:
    """{(dtype, threads): {"times": ..., "outputs": ...}} and the thread report lines."""
    import numpy as np

    idx = np.random.default_rng(0).integers(0, 50257, (1, args.tokens))  # (1, T)
    timings, thread_lines = {}, []
    for dtype in args.dtypes.split(","):
        print(f"{dtype}: loading both models")
        calls = contestants(folder, dtype, idx)
        for n in args.threads:
            line = set_threads(n)
            from machine import gemm_peak
            peak = gemm_peak(1024 if args.quick else 2048)
            line += f"; measured float32 GEMM peak {peak:.0f} GFLOP/s"
            PEAKS[n] = peak
            print(f"  {line}")
            if line not in thread_lines:
                thread_lines.append(line)
            times = time_interleaved(calls, args.repeats)
            timings[dtype, n] = {"times": times, "outputs": {k: c[0] for k, c in calls.items()}}
            for name, s in times.items():
                print(f"  {dtype} {n} thread(s) {name:30s} median {s['median']:.3f} s  "
                      f"min {s['min']:.3f} s  user {s['user']:.3f} s  sys {s['sys']:.3f} s")
        del calls
    return timings, thread_lines


# -------------------------------------------------------------------------- report

def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _time_rows(timings: dict) -> list[list[str]]:
    return [[dtype, str(n), name, t["outputs"][name], f"{s['median']:.3f}", f"{s['min']:.3f}",
             f"{s['user']:.3f}", f"{s['sys']:.3f}"]
            for (dtype, n), t in timings.items() for name, s in t["times"].items()]


PEAKS: dict[int, float] = {}  # threads -> measured float32 GEMM GFLOP/s


def _peak_rows(timings: dict, tokens: int) -> list[list[str]]:
    rows = []
    for (dtype, n), t in timings.items():
        if dtype != "float32":
            continue
        for name in ("numgpt forward", "numgpt forward [reference]", "transformers sdpa"):
            if name in t["times"]:
                rate = forward_flops(tokens) / t["times"][name]["median"] / 1e9
                rows.append([str(n), name, f"{rate:.0f}", f"{PEAKS[n]:.0f}", f"{100 * rate / PEAKS[n]:.0f}%"])
    return rows


def _ratio_rows(timings: dict) -> list[list[str]]:
    rows = []
    for (dtype, n), t in timings.items():
        ours = t["times"]["numgpt forward"]
        for attn in HF_ATTENTION:
            theirs = t["times"][f"transformers {attn}"]
            wall, user = theirs["median"] / ours["median"], theirs["user"] / ours["user"]
            target = TARGETS.get(dtype, 1.0)
            rows.append([dtype, str(n), f"transformers {attn} / numgpt forward", f"{wall:.2f}x",
                         f"{user:.2f}x", f">= {target:g}x", "yes" if wall >= target else "NO",
                         "yes" if user >= target else "NO"])
    return rows


def report(args, env: dict, thread_lines: list[str], timings: dict, memory: dict) -> str:
    lines = ["Generated by `benchmarks/bench_forward.py`; do not edit by hand. GPT-2 small shape "
             "(12 layers, 12 heads, 768 wide, vocab 50257), random weights saved by "
             "`save_pretrained` and loaded by `numgpt.load` (logits checked equal first). "
             f"One forward of B=1, T={args.tokens} tokens; one warm-up, then {args.repeats} "
             "interleaved calls per implementation; times in seconds. User and sys CPU are the "
             "process's times summed over its threads: user CPU is the computation, which other "
             "processes on a shared machine disturb less than wall time; sys CPU is mostly the "
             "kernel mapping fresh memory (page faults), e.g. for the (1, T, 50257) logits.", "",
             f"- machine: {env['cpu']}, {env['cores']} cores; load average (1, 5, 15 min) before: "
             f"{env['load_before']}, after: {env['load_after']}",
             f"- torch {env['torch']}, transformers {env['transformers']}, numpy {env['numpy']}; "
             f"numgpt's GEMM library: {env['gemm']}"]
    lines += [f"- {ln}" for ln in thread_lines]
    lines += ["", "### Time per forward", ""]
    lines += _table(_time_rows(timings), ["dtype", "threads", "implementation", "output",
                                          "median wall", "min wall", "median user CPU",
                                          "median sys CPU"])
    lines += ["", "The prefill row runs the same layers through the KV-cache path but computes "
              "logits for the last position only (no T x 50257 head); it is what generation "
              "uses, and it is not part of the ratios.", "",
              "### Ratio: transformers time / numgpt forward time (> 1: numgpt is faster)", ""]
    lines += _table(_ratio_rows(timings), ["dtype", "threads", "ratio", "by median wall",
                                           "by median user CPU", "target", "met (wall)",
                                           "met (user CPU)"])
    lines += ["", f"### float32 FLOP rate as a share of the measured GEMM peak (target >= {PEAK_TARGET:.0%})", "",
              f"FLOPs of one causal {args.tokens}-token forward: {forward_flops(args.tokens) / 1e9:.1f} G "
              "(12 C^2 weights per layer per token, the tied head, causal attention)", ""]
    lines += _table(_peak_rows(timings, args.tokens), ["threads", "implementation", "GFLOP/s",
                                                       "GEMM peak GFLOP/s", "share of peak"])
    lines += [f"", f"numgpt kernels path: {KERNELS}"]
    lines += ["", "### Peak memory of a 124M float32 inference process", "",
              "A fresh subprocess imports numgpt (no torch), loads the saved `model.safetensors` "
              f"with `numgpt.load` and runs one {args.tokens}-token forward; MB.", ""]
    lines += _table([[mode, f"{m[0]:.0f}", f"{m[1]:.0f}", f"{m[2]:.0f}", f"{m[3]:.0f}",
                      f"< {MEMORY_TARGET_MB}", "yes" if m[2] < MEMORY_TARGET_MB else "NO"]
                     for mode, m in memory.items()],
                    ["forward", "ru_maxrss after import", "after load", "peak ru_maxrss",
                     "peak VmHWM", "target", "met"])
    return "\n".join(lines) + "\n"


def _write(path: str, cpu: str, text: str) -> None:
    """``text`` as the section of ``cpu`` in ``path``; the other CPUs' sections stay."""
    from machine import write_cpu_section

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_cpu_section(path, TITLE, INTRO, cpu, text)


def _environment() -> dict:
    import numpy
    import torch
    import transformers
    from machine import cpu_model, gemm_library

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "gemm": gemm_library()}


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


PEAK_TARGET = 0.75


def main(argv=None) -> int:
    global KERNELS
    args = _parse(argv)
    KERNELS = args.kernels
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # machine.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from numgpt.core.threads import let_openmp_threads_sleep

    let_openmp_threads_sleep()  # before torch loads OpenMP: both sides share the setting
    if args.memory_child:
        memory_child(*args.memory_child, args.tokens)
        return 0
    if args.save_child:
        save_child(args.save_child)
        return 0
    import tempfile

    memory = {}
    load_before = _load()
    with tempfile.TemporaryDirectory() as folder:
        # nothing heavy is imported here until the memory children have run (see measure_memory)
        _run_self("--save-child", folder)
        print(f"saved a random-weight GPT-2 124M to {folder}: {sorted(os.listdir(folder))}")
        for mode, label in (("prefill", "forward_cached prefill (last logits)"),
                            ("forward", "forward under no_grad (all logits)")):
            memory[label] = measure_memory(folder, mode, args.tokens)
            print(f"  peak memory, {label}: {memory[label][2]:.0f} MB")
        timings, thread_lines = run_timings(args, folder)
    env = {**_environment(), "load_before": load_before, "load_after": _load()}
    text = report(args, env, thread_lines, timings, memory)
    print(text)
    if args.out:
        _write(args.out, env["cpu"], text)
        print(f"wrote {os.path.normpath(args.out)} (section {env['cpu']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
