"""124M forward speed and inference memory: numgpt against Hugging Face ``transformers``.

One process builds a ``transformers.GPT2LMHeadModel`` with random weights on the GPT-2
small shape, saves it with ``save_pretrained`` to a temporary folder and loads that folder
with numgpt's importer (``numgpt.load``), so both libraries hold identical weights (the
script checks their logits agree before timing anything). Then, for float32 and float64
(HF ``.double()``), it times a 1024-token forward (B=1):

* numgpt ``model.forward`` under ``no_grad``: logits for all 1024 positions (what HF returns);
* numgpt ``forward_cached`` prefill: the same work through the KV-cache path, but logits for
  the last position only (what generation needs); reported separately, not compared;
* transformers under ``torch.no_grad()``, eager attention and sdpa attention (all logits).

Every implementation gets one warm-up call, then the calls are interleaved round-robin so
a noisy neighbour slows all of them alike; the table reports the median wall time (and the
minimum and the median process CPU time, which a shared machine disturbs less). numpy's
BLAS and torch run with the same thread count (``--threads``, default: every core).

Peak memory of a 124M float32 inference process is measured in fresh subprocesses that
only import numgpt, load the saved ``model.safetensors`` with ``numgpt.load`` and run one
1024-token forward: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.

    python benchmarks/bench_forward.py [--threads N] [--repeats 3] [--quick]

Prints the tables and writes them to ``docs/results/bench_forward.md``. Targets (issue 3):
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


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for numpy's BLAS and for torch (default: every core)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    p.add_argument("--tokens", type=int, default=1024, help="prompt length (<= 1024)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated dtypes to time")
    p.add_argument("--quick", action="store_true", help="1 repeat, 256 tokens (a smoke run)")
    p.add_argument("--out", default=None,
                   help=f"where the markdown table goes (default {os.path.relpath(RESULTS)}; "
                        "--quick writes nothing unless --out is given)")
    p.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--save-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens = 1, 256
    elif args.out is None:
        args.out = RESULTS
    return args


def _set_threads(n: int) -> None:
    """Must run before numpy is imported: OpenBLAS reads these once, at load time."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


# --------------------------------------------------------------- memory (subprocess)

def memory_child(folder: str, mode: str, tokens: int) -> None:
    """Load the model with numgpt only, run one forward, print the peak RSS in MB.

    mode "prefill": ``forward_cached`` (last position's logits, the generation path);
    mode "forward": ``model.forward`` under no_grad (all logits, (1, T, V)).
    """
    import resource

    import numpy as np

    from numgpt.tensor import no_grad

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    def hwm_mb() -> float:  # the kernel's peak RSS of this address space, a cross-check
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024

    after_import = rss_mb()
    model = load_numgpt(folder, "float32")
    after_load = rss_mb()
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, tokens))
    if mode == "prefill":
        logits = model.forward_cached(idx, model.new_cache(1, tokens))
    else:
        with no_grad():
            logits = model(idx)[0].data
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    print(f"MEMORY {after_import:.1f} {after_load:.1f} {rss_mb():.1f} {hwm_mb():.1f}")


def measure_memory(folder: str, mode: str, tokens: int, threads: int) -> tuple[float, ...]:
    """Run ``memory_child`` in a fresh interpreter: (after import, after load, peak, VmHWM) MB.

    Call it while this process is still small: Linux carries ``ru_maxrss`` across exec,
    so a child started by a process holding two 124M models would report their size.
    """
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads),
           "--tokens", str(tokens), "--memory-child", folder, mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("MEMORY "))
    return tuple(float(x) for x in line.split()[1:])


def save_child(folder: str) -> None:
    """Save a random-weight GPT-2 124M (HF format, safetensors) to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)


# ------------------------------------------------------------------------- timing

def _blas_threads() -> str:
    """OpenBLAS's own thread count and config, read from the library numpy loaded."""
    import ctypes

    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            try:
                n = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                cfg = getattr(lib, f"{prefix}_get_config{suffix}")
            except AttributeError:
                continue
            n.restype, cfg.restype = ctypes.c_int, ctypes.c_char_p
            return f"{cfg().decode()} with {n()} threads ({os.path.basename(path)})"
    return "unknown (no OpenBLAS library found in this process)"


def _hf_model(folder: str, attn: str, dtype: str):
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn)
    model = model.double() if dtype == "float64" else model.float()
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    return model.eval().requires_grad_(False), torch


def load_numgpt(folder: str, dtype: str):
    """``numgpt.load`` (the importer users run); if this checkout has none yet, copy the
    safetensors weights in by name (HF's Conv1D weights are (in, out) like ours)."""
    import numgpt

    try:
        return numgpt.load(folder, dtype=dtype)
    except (AttributeError, ImportError):
        import json

        from safetensors.numpy import load_file

        from numgpt.model import GPT, GPTConfig

        hf = json.load(open(os.path.join(folder, "config.json")))
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dtype=dtype,
                           layer_norm_epsilon=hf["layer_norm_epsilon"])
        model = GPT(config, seed=None)
        weights = {k.removeprefix("transformer."): v for k, v in
                   load_file(os.path.join(folder, "model.safetensors")).items()}
        for name, p in model.parameters().items():
            p.data[...] = weights.pop(name)
        return model


def contestants(folder: str, dtype: str, idx):
    """{label: (output description, zero-argument callable)} for one dtype."""
    import numpy as np

    from numgpt.tensor import no_grad

    model = load_numgpt(folder, dtype)
    hf = {attn: _hf_model(folder, attn, dtype) for attn in ("eager", "sdpa")}
    torch = hf["eager"][1]
    ids = torch.from_numpy(idx)

    def numgpt_forward():
        with no_grad():
            return model(idx)[0].data  # (1, T, V)

    def numgpt_prefill():
        return model.forward_cached(idx, model.new_cache(1, idx.shape[1]))  # (1, V)

    def transformers_call(m):
        def run():
            with torch.no_grad():
                return m(ids).logits  # (1, T, V)
        return run

    # same weights, same logits: a benchmark of two different models would be meaningless
    ours = numgpt_forward()
    for attn, (m, _) in hf.items():
        theirs = transformers_call(m)().numpy()
        diff = float(np.max(np.abs(ours - theirs)))
        limit = 1e-3 if dtype == "float32" else 1e-8
        if not diff < limit:
            raise SystemExit(f"{dtype} logits of numgpt and transformers ({attn}) differ by {diff:.3g} "
                             f"(> {limit:g}): the two models are not the same; not timing them")
        print(f"  {dtype} logits max |numgpt - transformers {attn}| = {diff:.2e}")
    last = numgpt_prefill()
    assert np.max(np.abs(last - ours[:, -1])) < (1e-4 if dtype == "float32" else 1e-10)
    return {
        "numgpt forward": ("all logits (1, T, V)", numgpt_forward),
        "numgpt forward_cached prefill": ("last position only (1, V)", numgpt_prefill),
        "transformers eager": ("all logits (1, T, V)", transformers_call(hf["eager"][0])),
        "transformers sdpa": ("all logits (1, T, V)", transformers_call(hf["sdpa"][0])),
    }


def time_interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """One warm-up each, then ``repeats`` round-robin rounds; wall and CPU seconds per call."""
    import gc
    import statistics
    import time

    for _, fn in calls.values():
        fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (_, fn) in calls.items():
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            del out
    return {name: {"median": statistics.median(wall[name]), "min": min(wall[name]),
                   "cpu": statistics.median(cpu[name])} for name in calls}


# -------------------------------------------------------------------------- report

def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def report(args, env: dict, timings: dict, memory: dict) -> str:
    lines = ["# 124M forward: numgpt vs transformers", "",
             "Generated by `benchmarks/bench_forward.py`; do not edit by hand. GPT-2 small shape "
             "(12 layers, 12 heads, 768 wide, vocab 50257), random weights saved by "
             "`save_pretrained` and loaded by `numgpt.load` (logits checked equal first). "
             f"One forward of B=1, T={args.tokens} tokens; one warm-up, then {args.repeats} "
             "interleaved calls per implementation; times in seconds.", ""]
    lines += [f"- machine: {env['cpu']}, {env['cores']} cores; load average before/after: "
              f"{env['load_before']} / {env['load_after']}",
              f"- threads: numpy BLAS {env['blas']}; torch {env['torch_threads']} threads "
              f"(torch {env['torch']}, transformers {env['transformers']}, numpy {env['numpy']})", ""]
    rows, ratios = [], []
    for dtype, t in timings.items():
        for name, stats in t["times"].items():
            rows.append([dtype, name, t["outputs"][name], f"{stats['median']:.3f}", f"{stats['min']:.3f}",
                         f"{stats['cpu']:.3f}"])
        ours = t["times"]["numgpt forward"]
        for hf in ("transformers eager", "transformers sdpa"):
            r_wall = t["times"][hf]["median"] / ours["median"]
            r_cpu = t["times"][hf]["cpu"] / ours["cpu"]
            target = TARGETS[dtype]
            ratios.append([dtype, f"{hf} / numgpt forward", f"{r_wall:.2f}x", f"{r_cpu:.2f}x",
                           f">= {target:g}x", "yes" if r_wall >= target else "NO"])
    lines += ["## Time per forward", ""]
    lines += _table(rows, ["dtype", "implementation", "output", "median wall", "min wall", "median CPU"])
    lines += ["", "The prefill row runs the same layers through the KV-cache path but computes logits "
              "for the last position only (no 1024 x 50257 head); it is shown for generation and is "
              "not part of the ratios.", "", "## Ratio (transformers time / numgpt time; > 1 means numgpt "
              "is faster)", ""]
    lines += _table(ratios, ["dtype", "ratio", "by median wall", "by median CPU", "target", "met (wall)"])
    if memory:
        lines += ["", "## Peak memory of a 124M float32 inference process", "",
                  "A fresh subprocess imports numgpt (no torch), loads the saved `model.safetensors` "
                  f"with `numgpt.load`, runs one {args.tokens}-token forward; `ru_maxrss` in MB.", ""]
        mem_rows = [[mode, f"{m[0]:.0f}", f"{m[1]:.0f}", f"{m[2]:.0f}", f"{m[3]:.0f}",
                     f"< {MEMORY_TARGET_MB}", "yes" if m[2] < MEMORY_TARGET_MB else "NO"]
                    for mode, m in memory.items()]
        lines += _table(mem_rows, ["forward", "ru_maxrss after import", "after load", "peak ru_maxrss",
                                   "peak VmHWM", "target", "met"])
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _environment(threads: int) -> dict:
    import platform

    import numpy
    import torch
    import transformers

    torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "blas": _blas_threads(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main(argv=None) -> int:
    args = _parse(argv)
    _set_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.tokens)
        return 0
    if args.save_child:
        save_child(args.save_child)
        return 0
    import subprocess
    import tempfile

    memory = {}
    with tempfile.TemporaryDirectory() as folder:
        # this process imports nothing heavy until the memory children have run
        subprocess.run([sys.executable, os.path.abspath(__file__), "--save-child", folder], check=True)
        print(f"saved a random-weight GPT-2 124M to {folder}: {sorted(os.listdir(folder))}")
        for mode, label in (("prefill", "forward_cached prefill (last logits)"),
                            ("forward", "forward under no_grad (all logits)")):
            memory[label] = measure_memory(folder, mode, args.tokens, args.threads)
            print(f"  peak memory, {label}: {memory[label][2]:.0f} MB")
        timings, env = run_timings(args, folder)
    text = report(args, env, timings, memory)
    print(text)
    if args.out:
        _write(args.out, text)
        print(f"wrote {os.path.normpath(args.out)}")
    return 0


def run_timings(args, folder: str) -> tuple[dict, dict]:
    import numpy as np

    env = _environment(args.threads)
    print(f"numpy BLAS: {env['blas']}; torch threads: {env['torch_threads']}")
    idx = np.random.default_rng(0).integers(0, 50257, (1, args.tokens))
    timings = {}
    for dtype in args.dtypes.split(","):
        print(f"{dtype}: building both models")
        calls = contestants(folder, dtype, idx)
        times = time_interleaved(calls, args.repeats)
        timings[dtype] = {"times": times, "outputs": {n: c[0] for n, c in calls.items()}}
        for name, s in times.items():
            print(f"  {name:32s} median {s['median']:.3f} s  min {s['min']:.3f} s  cpu {s['cpu']:.3f} s")
        del calls
    env["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return timings, env


if __name__ == "__main__":
    sys.exit(main())
