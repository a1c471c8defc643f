"""KV-cache decode speed: numgpt against Hugging Face ``transformers``, batch 1, float32.

One process builds a ``transformers.GPT2LMHeadModel`` with random weights, saves it with
``save_pretrained`` and loads the folder with ``numgpt.load``, so both hold the same
weights; the script checks that both give the same greedy tokens before timing anything.
For the GPT-2 124M shape (and the medium shape unless ``--skip-medium``) it measures:

* decode tokens/s after a 32-token prompt, greedy:
  - numgpt ``sample.stream`` (the user-facing generator: KV cache, ``select_next``); the
    rate is taken between the first and the last yielded token, so the prefill is excluded;
  - transformers, a manual ``past_key_values`` loop (the fastest HF path), and
    ``generate(do_sample=False, use_cache=True)`` (rate from the difference of an n-token
    and a 1-token call); numgpt is compared with the FASTER of the two;
* prefill of the 32-token prompt into a fresh cache, logits of the last position only
  (numgpt ``forward_cached``; transformers ``model(..., use_cache=True, logits_to_keep=1)``);
* the memory-bandwidth ceiling: the read bandwidth of a 512 MiB float32 array (the best of
  ``machine.read_sweep``'s sweep on every thread, numpy ``sum`` and BLAS ``dot``, timed in
  the same interleaved rounds) divided by the bytes of weights one decode step reads (every
  parameter once except ``wpe``, of which one row is read); numgpt's and transformers' rates
  as fractions of it, and the rate each decode streams its weights (bytes per token x
  tokens/s) beside it, with a WARNING when a decode streams faster than the "ceiling".

Implementations run interleaved, round-robin, so a noisy neighbour slows them alike; the
table reports medians. numpy's BLAS and torch use the same thread count (``--threads``,
default every core).

    python benchmarks/bench_decode.py [--threads N] [--tokens 64] [--repeats 5] [--quick]

Writes this CPU's section of ``docs/results/bench_decode.md`` (``machine.write_cpu_section``:
another CPU's section stays). Targets (issue 5): 124M decode >= 45 tokens/s and
>= 1.6x transformers; medium >= 1.5x; prefill of 32 tokens no slower than transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results",
                       "bench_decode.md")
TITLE = "KV-cache decode: numgpt vs transformers (float32, batch 1)"
INTRO = ("One section per CPU measured (a result on one vendor says little about the other); "
         "`python benchmarks/bench_decode.py` on a CPU replaces only that CPU's section.")
SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768),
          "medium": dict(n_layer=24, n_head=16, n_embd=1024)}
TARGETS = {"tokens_per_s_124M": 45.0, "ratio_124M": 1.6, "ratio_medium": 1.5, "prefill_ratio": 1.0}
PROMPT_LEN = 32


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for numpy's BLAS and for torch (default: every core)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per timed decode")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    p.add_argument("--skip-medium", action="store_true", help="time the 124M shape only")
    p.add_argument("--quick", action="store_true", help="2 rounds of 16 tokens, 124M only; writes nothing")
    p.add_argument("--kernels", choices=["fast", "reference"], default="fast",
                   help="numgpt's op path (default fast)")
    p.add_argument("--out", default=None, help="markdown output (default docs/results/bench_decode.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens, args.skip_medium = 2, 16, True
    elif args.out is None:
        args.out = RESULTS
    return args


# ------------------------------------------------------------------------- timers


def numgpt_decode(model, prompt, n: int) -> float:
    """Tokens/s of numgpt's generator between its first and last yielded token."""
    from numgpt.infer.sample import SamplingParams, stream

    stamps = [time.perf_counter() for _ in stream(model, prompt, n, SamplingParams(temperature=0))]
    return (n - 1) / (stamps[-1] - stamps[0])


def hf_loop_decode(hf, prompt, n: int) -> float:
    """Tokens/s of a manual past_key_values greedy loop (prefill excluded)."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        start = time.perf_counter()
        for _ in range(n - 1):
            out = hf(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (n - 1) / (time.perf_counter() - start)


def hf_generate_decode(hf, prompt, n: int) -> float:
    """Tokens/s of ``generate`` from the difference of an n-token and a 1-token call."""
    import torch

    x = torch.tensor([prompt])
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)

    def run(k: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(x, max_new_tokens=k, min_new_tokens=k, **kw)
        assert out.shape[1] == len(prompt) + k
        return time.perf_counter() - start
    return (n - 1) / (run(n) - run(1))


def numgpt_prefill(model, prompt) -> float:
    import numpy as np

    start = time.perf_counter()
    cache = model.new_cache(1, len(prompt) + 1)
    model.forward_cached(np.asarray([prompt]), cache)
    return time.perf_counter() - start


def hf_prefill(hf, prompt) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def bandwidth_job(threads: int):
    """A timer of the read bandwidth (GB/s) over a 512 MiB float32 array: the best of the
    all-thread sweep of ``machine.read_sweep``, numpy ``sum`` and BLAS ``dot`` (each is a
    rate memory was read at, so the best is the figure). Run inside the interleaved rounds,
    so the ceiling is measured under the same neighbours as the decode it is compared with."""
    import numpy as np
    from machine import read_sweep

    a = np.ones(1 << 27, dtype=np.float32)  # 512 MiB
    sweep = read_sweep(threads=threads, x=a)

    def job() -> float:
        best = 0.0
        for f in (sweep, lambda: a.sum(), lambda: float(np.dot(a, a))):
            start = time.perf_counter()
            f()
            best = max(best, a.nbytes / (time.perf_counter() - start) / 1e9)
        return best
    return job


# ------------------------------------------------------------------------- setup


def build(shape: dict, folder: str):
    """Random HF model saved to ``folder`` and the numgpt model loaded from it."""
    import torch
    import transformers

    import numgpt

    torch.manual_seed(0)
    config = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None,
                                     initializer_range=0.05)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(folder)
    model = numgpt.load(folder)
    model.set_kernels(KERNELS)
    return hf, model


KERNELS = "fast"  # numgpt's op path, from --kernels


def check_same_tokens(hf, model, prompt) -> None:
    import torch

    from numgpt.infer.sample import SamplingParams, generate

    ours = generate(model, prompt, 8, SamplingParams(temperature=0))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                             min_new_tokens=8, pad_token_id=0)[0, len(prompt):].tolist()
    if ours != theirs:
        sys.exit(f"numgpt and transformers disagree on greedy tokens: {ours} vs {theirs}")


def weight_bytes_per_token(model) -> int:
    """Bytes of parameters one decode step reads: all of them once, except wpe (one row)."""
    params = model.parameters()
    total = sum(p.data.nbytes for p in params.values())
    wpe = params["wpe.weight"].data
    return total - wpe.nbytes + wpe[0].nbytes


def interleaved(jobs: dict, repeats: int) -> dict:
    """Run every job once as warm-up, then ``repeats`` round-robin rounds; lists per job."""
    for job in jobs.values():
        job()
    out = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            out[name].append(job())
    return out


def measure_shape(name: str, args) -> dict:
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        hf, model = build(SHAPES[name], folder)
    prompt = np.random.default_rng(0).integers(0, 50257, PROMPT_LEN).tolist()
    check_same_tokens(hf, model, prompt)
    n = args.tokens
    rates = interleaved({
        "numgpt": lambda: numgpt_decode(model, prompt, n),
        "hf_loop": lambda: hf_loop_decode(hf, prompt, n),
        "hf_generate": lambda: hf_generate_decode(hf, prompt, n),
        "bandwidth": bandwidth_job(args.threads),
    }, args.repeats)
    prefill = interleaved({"numgpt": lambda: numgpt_prefill(model, prompt),
                           "hf": lambda: hf_prefill(hf, prompt)}, max(args.repeats, 5) * 2)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"shape": name, "decode": med, "hf_best": max(med["hf_loop"], med["hf_generate"]),
            "bandwidth": med["bandwidth"],
            "prefill": {k: statistics.median(v) for k, v in prefill.items()},
            "bytes": weight_bytes_per_token(model), "params": model.num_parameters()}


# ------------------------------------------------------------------------- report


def report(rows: list[dict], args) -> str:
    lines = [f"Written by `benchmarks/bench_decode.py` ({args.threads} threads, {args.tokens} new "
             f"tokens after a {PROMPT_LEN}-token prompt, median of {args.repeats} interleaved "
             f"rounds; cpu count {os.cpu_count()}). The ceiling is the read bandwidth measured in the "
             f"same rounds divided by the bytes of weights one step reads.",
             "", "| shape | numgpt tok/s | HF loop tok/s | HF generate tok/s | ratio vs best HF | "
             "target | bandwidth GB/s | ceiling tok/s | numgpt / ceiling | best HF / ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, ratio = r["decode"], r["decode"]["numgpt"] / r["hf_best"]
        ceiling = r["bandwidth"] * 1e9 / r["bytes"]
        target = TARGETS[f"ratio_{r['shape']}"]
        extra = f", >= {TARGETS['tokens_per_s_124M']:.0f} tok/s" if r["shape"] == "124M" else ""
        lines.append(f"| {r['shape']} ({r['params'] / 1e6:.0f}M params, {r['bytes'] / 1e6:.0f} MB read/token) "
                     f"| {d['numgpt']:.1f} | {d['hf_loop']:.1f} | {d['hf_generate']:.1f} | "
                     f"{ratio:.2f}x | >= {target}x{extra} | {r['bandwidth']:.1f} | {ceiling:.1f} | "
                     f"{d['numgpt'] / ceiling:.0%} | {r['hf_best'] / ceiling:.0%} |")
    lines += ["", "| shape | numgpt prefill 32 (ms) | HF prefill 32 (ms) | HF time / numgpt time | target |",
              "|---|---|---|---|---|"]
    for r in rows:
        p = r["prefill"]
        lines.append(f"| {r['shape']} | {p['numgpt'] * 1e3:.1f} | {p['hf'] * 1e3:.1f} | "
                     f"{p['hf'] / p['numgpt']:.2f}x | >= {TARGETS['prefill_ratio']}x |")
    from machine import check_streaming

    lines.append("")
    for r in rows:  # a decode cannot read memory faster than memory is read: checks the ceiling
        for who, rate in (("numgpt", r["decode"]["numgpt"]), ("best HF", r["hf_best"])):
            lines.append("- " + check_streaming(f"{r['shape']} {who}", r["bytes"], rate, r["bandwidth"]))
    r0 = rows[0]
    verdicts = [("124M tokens/s", r0["decode"]["numgpt"] >= TARGETS["tokens_per_s_124M"]),
                ("124M ratio", r0["decode"]["numgpt"] / r0["hf_best"] >= TARGETS["ratio_124M"]),
                ("124M prefill", r0["prefill"]["hf"] >= r0["prefill"]["numgpt"])]
    if len(rows) > 1:
        verdicts.append(("medium ratio", rows[1]["decode"]["numgpt"] / rows[1]["hf_best"]
                         >= TARGETS["ratio_medium"]))
    lines += ["", "Targets: " + "; ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in verdicts)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global KERNELS
    args = _parse(argv)
    KERNELS = args.kernels
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # machine.py
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)  # before NumPy loads
    import torch
    from machine import Machine, write_cpu_section

    torch.set_num_threads(args.threads)
    machine = Machine.measure(args.threads, quick=args.quick)
    print(machine.describe(), flush=True)
    rows = [measure_shape(name, args) for name in (["124M"] if args.skip_medium else list(SHAPES))]
    text = report(rows, args) + f"\n- {machine.describe()}; numgpt kernels={KERNELS}\n"
    print(text)
    if args.out:  # this CPU's section; the other CPUs' sections stay
        write_cpu_section(args.out, TITLE, INTRO, machine.cpu, text)
        print(f"wrote {os.path.relpath(args.out)} (section {machine.cpu!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
