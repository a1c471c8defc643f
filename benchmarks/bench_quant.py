"""q8_0 decode speed and memory: numgpt q8_0 vs numgpt float32 vs ``transformers`` float32.

One process builds a ``transformers.GPT2LMHeadModel`` with random weights (GPT-2 124M and,
unless ``--skip-medium``, medium shapes), saves it with ``save_pretrained``, loads it with
``numgpt.load`` (float32) and a second time quantized in memory (``quant.quantize_model``,
what ``numgpt quantize`` does). It reports how many greedy tokens q8_0 shares with float32
(random weights have flat distributions, so a few may differ; the quality gate on a trained
model is tests/test_quant.py), then times, interleaved round-robin so a noisy neighbour
slows all alike, medians of ``--repeats`` rounds:

* decode tokens/s, batch 1, after a 32-token prompt, greedy, through ``sample.stream``
  (numgpt, both representations; the rate between the first and the last yielded token)
  and a manual ``past_key_values`` loop (transformers, its fastest path);
* batched decode (4 sequences, the server's case) for numgpt q8_0 and float32;
* the read-bandwidth ceiling: bandwidth of a 512 MiB array / bytes of weights per token;
* the same decodes with 8-bit activations (``quant.set_activations(model, "q8_0")``, what
  ``numgpt quantize --activations q8_0`` records), beside weights-only q8_0;
* per-call kernel times (min of ``KERNEL_REPEATS`` calls, the weights in cache) of one
  q8_0 matmul at 1, 4, 16 and 64 rows of activations at the 124M shapes 768 x 2304,
  3072 x 768 and the 50257 x 768 head: float activations (the kernel ``quant.kernel_for``
  names), 8-bit activations, and the float32 product through the GEMM library, so the
  crossovers written in ``numgpt/core/quant.py`` can be checked on each CPU.

Peak memory: separate subprocesses each load one checkpoint (numgpt float32, numgpt q8_0,
saved to a temporary folder) and generate 16 tokens; each reports its peak RSS
(``VmHWM``) and its peak just before loading (the interpreter and imports), so the table
shows the whole process and the part the model adds.

    python benchmarks/bench_quant.py [--threads N] [--tokens 64] [--repeats 5] [--skip-medium] [--quick]

Writes this CPU's section of ``docs/results/bench_quant.md`` (``machine.write_cpu_section``:
another CPU's section stays); not in ``--quick`` mode, which uses a small model and small
matrices and proves the script runs. Targets (issue 14): 124M and medium q8_0 decode >= 2x
numgpt float32 and >= 2.5x transformers float32; peak memory of a 124M q8_0 process <= 45%
of the float32 one; (issue 19) q8_0 decode >= 1.8x numgpt's float32.
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
RESULTS = os.path.join(REPO, "docs", "results", "bench_quant.md")
SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768),
          "medium": dict(n_layer=24, n_head=16, n_embd=1024),
          "quick": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=2048, n_positions=128)}
TARGETS = {"vs_f32": 2.0, "vs_hf": 2.5, "memory": 0.45}
PROMPT_LEN = 32
BATCH = 4
KERNEL_SHAPES = {False: [(768, 2304), (3072, 768), (768, 50257)],  # (K in, N out): 124M
                 True: [(128, 384), (512, 128), (128, 2048)]}  # --quick
KERNEL_ROWS = (1, 4, 16, 64)
KERNEL_REPEATS = 9
TITLE = "q8_0: decode, 8-bit activations, kernels and memory"


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for BLAS, numba and torch (default: every core)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per timed decode")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    p.add_argument("--skip-medium", action="store_true", help="124M shape only")
    p.add_argument("--quick", action="store_true",
                   help="a small model, 2 rounds of 8 tokens; writes nothing (proves the script runs)")
    p.add_argument("--out", default=None, help="markdown output (default docs/results/bench_quant.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens = 2, 8
    elif args.out is None:
        args.out = RESULTS
    return args


# ------------------------------------------------------------------------- timers

from bench_decode import numgpt_decode  # noqa: E402  (same timer; scripts run from benchmarks/)

def numgpt_batched_decode(model, prompt, n: int) -> float:
    """Tokens/s summed over BATCH sequences decoding together (one forward_cached per step)."""
    import numpy as np

    cache = model.new_cache(BATCH, len(prompt) + n)
    logits = model.forward_cached(np.array([prompt] * BATCH), cache)
    start = time.perf_counter()
    for _ in range(n):
        tokens = np.argmax(logits, axis=-1)[:, None]  # (BATCH, 1)
        logits = model.forward_cached(tokens, cache)
    return BATCH * n / (time.perf_counter() - start)


def hf_loop_decode(hf, prompt, n: int) -> float:
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        start = time.perf_counter()
        for _ in range(n - 1):
            out = hf(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (n - 1) / (time.perf_counter() - start)


def bandwidth_job():
    import numpy as np

    a = np.ones(1 << 27, dtype=np.float32)  # 512 MiB

    def job() -> float:
        start = time.perf_counter()
        a.sum()
        return a.nbytes / (time.perf_counter() - start) / 1e9
    return job


def interleaved(jobs: dict, repeats: int) -> dict:
    for job in jobs.values():
        job()  # warm-up (and numba's first call)
    out = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            out[name].append(job())
    return {k: statistics.median(v) for k, v in out.items()}


# -------------------------------------------------------------------------- setup

def build(shape: dict, folder: str):
    """HF model with random weights saved to ``folder``; numgpt float32 and q8_0 loads of it."""
    import torch
    import transformers

    import numgpt
    from numgpt.core import quant

    torch.manual_seed(0)
    config = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None,
                                     initializer_range=0.05)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(folder)
    q8a = quant.quantize_model(numgpt.load(folder), activations="q8_0")
    return hf, numgpt.load(folder), quant.quantize_model(numgpt.load(folder)), q8a


def greedy_agreement(f32, q8, prompt, n: int = 16) -> int:
    from numgpt.infer.sample import SamplingParams, generate

    a = generate(f32, prompt, n, SamplingParams(temperature=0))
    b = generate(q8, prompt, n, SamplingParams(temperature=0))
    return sum(x == y for x, y in zip(a, b))


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: everything once except wpe (one row)."""
    from numgpt.core import quant

    wpe = model.wpe.weight.data
    return quant.weight_bytes(model)["total"] - wpe.nbytes + wpe[0].nbytes


def measure_shape(name: str, args) -> dict:
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        hf, f32, q8, q8a = build(SHAPES[name], folder)
    vocab = f32.config.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, PROMPT_LEN).tolist()
    agree = greedy_agreement(f32, q8, prompt)
    agree_a = greedy_agreement(f32, q8a, prompt)
    n = args.tokens
    rates = interleaved({"q8_0": lambda: numgpt_decode(q8, prompt, n),
                         "q8_0_a8": lambda: numgpt_decode(q8a, prompt, n),
                         "f32": lambda: numgpt_decode(f32, prompt, n),
                         "hf": lambda: hf_loop_decode(hf, prompt, n),
                         "bandwidth": bandwidth_job()}, args.repeats)
    batched = interleaved({"q8_0": lambda: numgpt_batched_decode(q8, prompt, n),
                           "q8_0_a8": lambda: numgpt_batched_decode(q8a, prompt, n),
                           "f32": lambda: numgpt_batched_decode(f32, prompt, n)}, args.repeats)
    return {"shape": name, "rates": rates, "batched": batched, "agree": agree, "agree_a8": agree_a,
            "bytes_q8": bytes_per_token(q8), "bytes_f32": bytes_per_token(f32)}


def kernel_times(quick: bool) -> list[dict]:
    """Per-call ms (min of KERNEL_REPEATS) of one matmul at each row count: q8_0 with float
    activations (and which kernel ran), q8_0 with 8-bit activations, float32 through the GEMM
    library (``x @ W`` with W (in, out), as a float ``Linear`` stores it)."""
    import numpy as np

    from numgpt.core import quant

    def best(f) -> float:
        f()
        times = []
        for _ in range(KERNEL_REPEATS):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    rng = np.random.default_rng(0)
    rows = []
    for K, N in KERNEL_SHAPES[quick]:
        w32 = rng.normal(0, 0.02, (K, N)).astype(np.float32)  # (in, out)
        q = quant.quantize_q8_0(w32.T)  # (out, in)
        qa = quant.quantize_q8_0(w32.T)
        qa.activations = "q8_0"
        for M in KERNEL_ROWS:
            x = rng.standard_normal((M, K)).astype(np.float32)
            rows.append({"shape": f"{K} x {N}", "rows": M, "kernel": quant.kernel_for(M),
                         "q8_0": best(lambda: quant.matmul(x, q)),
                         "q8_0_a8": best(lambda: quant.matmul(x, qa)),
                         "f32": best(lambda: x @ w32)})
    return rows


# ------------------------------------------------------------------- peak memory

_MEMORY_CHILD = r"""
import json, sys
import numpy as np
import numgpt
def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss keeps the parent's across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
from numgpt.core import quant
from numgpt.infer.sample import SamplingParams, generate
before = peak_kb()
model = numgpt.load(sys.argv[1])
generate(model, list(range(16)), 16, SamplingParams(temperature=0))
peak = peak_kb()
print(json.dumps({"before_kb": before, "peak_kb": peak}))
"""


def measure_memory(name: str, threads: int) -> dict:
    """Peak RSS (VmHWM) of one process per representation, each importing numgpt, loading a
    numgpt checkpoint and generating: each does only what it needs (the compiled kernels
    are loaded on first use, inside the measured part)."""
    import torch
    import transformers

    import numgpt
    from numgpt.core import quant
    from numgpt.io import checkpoint

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[name]))
        hf.save_pretrained(os.path.join(folder, "hf"))
        del hf
        model = numgpt.load(os.path.join(folder, "hf"))
        checkpoint.save(model, os.path.join(folder, "f32"))
        checkpoint.save(quant.quantize_model(model), os.path.join(folder, "q8"))
        del model
        env = {**os.environ, "PYTHONPATH": REPO, **{v: str(threads) for v in (
            "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}
        for kind in ("f32", "q8"):
            done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, os.path.join(folder, kind)],
                                  capture_output=True, text=True, env=env, check=True)
            out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------- report

def report(rows: list[dict], kernels: list[dict], memory: dict | None, args, machine) -> str:
    """This CPU's section (its headings are ###, so write_cpu_section sees only CPUs)."""
    from numgpt.core import quant

    lines = [f"Written by `benchmarks/bench_quant.py` ({machine.describe()}; "
             f"{args.threads} threads for BLAS, numba and torch; {args.tokens} new tokens after a "
             f"{PROMPT_LEN}-token prompt; median of {args.repeats} interleaved rounds). Random "
             f"weights; the ceiling is the read bandwidth measured in the same rounds divided by "
             f"the weight bytes one token reads. Kernels: {quant.kernel_plan()}.", "",
             "### Decode, batch 1: numgpt q8_0 vs numgpt float32 vs transformers float32", "",
             "| shape | q8_0 tok/s | q8_0 + 8-bit activations tok/s | f32 tok/s | transformers tok/s "
             "| q8_0 / f32 | 8-bit act. / f32 | q8_0 / transformers | q8_0 MB/token | q8_0 ceiling "
             "tok/s | f32 ceiling tok/s | greedy tokens equal (16): q8_0, 8-bit act. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, bw = r["rates"], r["rates"]["bandwidth"] * 1e9
        lines.append(f"| {r['shape']} | {t['q8_0']:.1f} | {t['q8_0_a8']:.1f} | {t['f32']:.1f} | "
                     f"{t['hf']:.1f} | {t['q8_0'] / t['f32']:.2f}x (>= {TARGETS['vs_f32']}x) | "
                     f"{t['q8_0_a8'] / t['f32']:.2f}x | "
                     f"{t['q8_0'] / t['hf']:.2f}x (>= {TARGETS['vs_hf']}x) | {r['bytes_q8'] / 1e6:.0f} | "
                     f"{bw / r['bytes_q8']:.0f} | {bw / r['bytes_f32']:.0f} | "
                     f"{r['agree']}/16, {r['agree_a8']}/16 |")
    lines += ["", f"### Batched decode ({BATCH} sequences, tokens/s summed)", "",
              "| shape | q8_0 | q8_0 + 8-bit activations | f32 | q8_0 / f32 | 8-bit act. / f32 |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["batched"]
        lines.append(f"| {r['shape']} | {b['q8_0']:.1f} | {b['q8_0_a8']:.1f} | {b['f32']:.1f} | "
                     f"{b['q8_0'] / b['f32']:.2f}x | {b['q8_0_a8'] / b['f32']:.2f}x |")
    lines += ["", f"### One matmul per call (ms, min of {KERNEL_REPEATS} calls, weights in cache)", "",
              "| in x out | rows | q8_0 kernel | q8_0 ms | q8_0 + 8-bit act. ms | f32 GEMM ms "
              "| f32 / q8_0 | f32 / 8-bit act. |", "|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        lines.append(f"| {k['shape']} | {k['rows']} | {k['kernel']} | {k['q8_0']:.3f} | "
                     f"{k['q8_0_a8']:.3f} | {k['f32']:.3f} | {k['f32'] / k['q8_0']:.2f}x | "
                     f"{k['f32'] / k['q8_0_a8']:.2f}x |")
    if memory:
        f, q = memory["f32"], memory["q8"]
        lines += ["", "### Peak memory (separate processes: load a numgpt checkpoint, generate 16 tokens)", "",
                  "| process | before loading MB | peak MB | peak - before MB |", "|---|---|---|---|"]
        for kind, m in (("float32", f), ("q8_0", q)):
            lines.append(f"| {kind} | {m['before_kb'] / 1024:.0f} | {m['peak_kb'] / 1024:.0f} | "
                         f"{(m['peak_kb'] - m['before_kb']) / 1024:.0f} |")
        lines += ["", f"q8_0 / float32 peak: {q['peak_kb'] / f['peak_kb']:.1%} of the whole process "
                  f"(target <= {TARGETS['memory']:.0%}), "
                  f"{(q['peak_kb'] - q['before_kb']) / (f['peak_kb'] - f['before_kb']):.1%} of what the "
                  f"model adds."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse(argv)
    sys.path.insert(0, REPO)
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)  # before NumPy loads
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)  # machine.py
    from machine import Machine

    machine = Machine.measure(args.threads, quick=args.quick)
    print(machine.describe(), flush=True)
    from numgpt.core import quant

    print(f"q8_0 kernels: {quant.kernel_plan()}", flush=True)
    kernels = kernel_times(args.quick)
    shapes = ["quick"] if args.quick else (["124M"] if args.skip_medium else ["124M", "medium"])
    rows = [measure_shape(name, args) for name in shapes]
    memory = measure_memory(shapes[0], args.threads)
    text = report(rows, kernels, memory, args, machine)
    print(text)
    if args.out:
        from machine import write_cpu_section

        write_cpu_section(args.out, TITLE, "One section per CPU measured (a result on one vendor "
                          "says little about the other); `python benchmarks/bench_quant.py` on a "
                          "CPU replaces only that CPU's section.", machine.cpu, text)
        print(f"wrote {os.path.relpath(args.out)} (section {machine.cpu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
