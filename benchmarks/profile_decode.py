"""Where one decode token goes: a per-part profile of ``forward_cached`` and the decoder, batch 1.

The GPT-2 124M shape with random weights and the GPT-2 vocabulary (50257), float32 and q8_0
(``quant.quantize_model``, what ``numgpt quantize`` does), at each ``--threads`` count (one
child process per count: BLAS reads its thread count once, when NumPy loads). One token is
decoded at position ``--position`` (the cache already holds that many). Each part is timed
on its own, with the arrays and weights of a real step, over every layer in turn (so each
layer's weights come from memory, not from the cache, as in decoding); the parts and the
whole step take turns for ``--repeats`` rounds and each reports its best (the minimum: the
machine may be shared with other work, and the minimum is the figure least disturbed by it):

    embed          token + position rows
    layernorms     ln_1 and ln_2 of every layer (the op of the model's path)
    c_attn ... mlp.c_proj   the four matrix products of every layer (ops.linear, or the
                   q8_0 kernel of a quantized model), bias included
    cache write    the new key and value into the KV cache
    attention      the cached-attention op over ``position + 1`` keys
    gelu           the MLP's activation
    residual adds  the two adds per layer
    ln_f + head    the final LayerNorm and the tied head (V logits)
    rest           the whole ``forward_cached`` step minus the parts above: Python per
                   layer, Tensor and op wrappers, checks, allocations
    decoder        one ``SequenceDecoder.step`` on the step's logits, greedy: ``select_next``
                   and the decoder's rules (stop, length, release)
    sampling       ``select_next`` alone with temperature 0.8, top-k 40, top-p 0.95; and with
                   temperature 0.8, top-p 0.9 (the whole vocabulary sorted)

``stream per token`` is the user-facing generator end to end (its prefill excluded), and
the floor is the bytes of weights one token reads (every matrix once, one row of ``wpe``)
over the read bandwidth measured in the same run (``machine.read_bandwidth``, all threads).

    python benchmarks/profile_decode.py [--threads 1,2] [--position 64] [--repeats 20] [--quick]

Prints the CPU, the GEMM library and one table per thread count (ms per token); writes
nothing. ``--quick``: a 2-layer, 128-wide model with a 2048-token vocabulary (a smoke run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHAPE = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
QUICK_SHAPE = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=2048, block_size=256)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--position", type=int, default=64, help="keys already in the cache (default 64)")
    p.add_argument("--repeats", type=int, default=20, help="timings per part; the best counts (default 20)")
    p.add_argument("--quick", action="store_true", help="a small model, 3 repeats (a smoke run)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one thread count
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.position = 3, min(args.position, 16)
    return args


def best(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of fn() (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_best(jobs: dict, repeats: int) -> dict[str, float]:
    """Seconds of the fastest call of each job, the jobs taking turns for ``repeats`` rounds
    (after one warm-up call each): a neighbour's burst slows every part of a round alike,
    so the step and its parts stay comparable and "rest" (their difference) means something."""
    for fn in jobs.values():
        fn()
    times = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def _linear(module, x):
    """The op a Linear or QuantizedLinear layer runs, on arrays: x (..., in) -> (..., out)."""
    from numgpt.core import ops, quant

    bias = None if module.bias is None else module.bias.data
    if isinstance(module, quant.QuantizedLinear):
        return quant.linear(x, module.weight, bias)
    return ops.linear(x, module.weight.data, bias)[0]


def profile(model, position: int, repeats: int) -> dict[str, float]:
    """Seconds per token of each part (see the module docstring) for one decoded token."""
    import numpy as np

    from numgpt.core.tensor import Tensor
    from numgpt.infer.choice import SamplingParams, select_next
    from numgpt.infer.decoder import SequenceDecoder
    from numgpt.infer.sample import stream

    c = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.vocab_size, position).tolist()
    cache = model.new_cache(1, position + 1)
    model.forward_cached(np.array([prompt]), cache)
    idx, rows, start = np.array([[prompt[-1]]]), np.array([0]), np.array([position])
    x = (model.wte(idx).data + model.wpe(start[:, None]).data)  # (1, 1, C)
    blocks = model.h

    def step():
        cache.lengths[0] = position
        return model.forward_cached(idx, cache)

    def over_layers(fn):
        return lambda: [fn(layer, b) for layer, b in enumerate(blocks)]

    ln = lambda layer, b: (b.ln_1.ops.layernorm(x, b.ln_1.weight.data, b.ln_1.bias.data, eps=b.ln_1.eps),
                           b.ln_2.ops.layernorm(x, b.ln_2.weight.data, b.ln_2.bias.data, eps=b.ln_2.eps))
    qkv = _linear(blocks[0].attn.c_attn, x)  # (1, 1, 3C)
    hidden = _linear(blocks[0].mlp.c_fc, x)  # (1, 1, 4C)
    gelu = getattr(blocks[0].mlp.ops, blocks[0].mlp.activation)
    attention = lambda layer, b: model.ops.cached_attention(
        qkv, cache.k, cache.v, layer=layer, rows=rows, start=start, n_head=c.n_head,
        block=b.attn.attention_block)
    parts = {
        "embed": lambda: model.wte(idx).data + model.wpe(start[:, None]).data,
        "layernorms (2 per layer)": over_layers(ln),
        "c_attn": over_layers(lambda layer, b: _linear(b.attn.c_attn, x)),
        "attn.c_proj": over_layers(lambda layer, b: _linear(b.attn.c_proj, x)),
        "mlp.c_fc": over_layers(lambda layer, b: _linear(b.mlp.c_fc, x)),
        "mlp.c_proj": over_layers(lambda layer, b: _linear(b.mlp.c_proj, hidden)),
        "cache write": over_layers(lambda layer, b: model._write_cache(qkv, cache, layer, rows, start)),
        "attention over the cache": over_layers(attention),
        "gelu": over_layers(lambda layer, b: gelu(hidden)),
        "residual adds (2 per layer)": over_layers(lambda layer, b: (x + x, x + x)),
        "ln_f + head": lambda: model.head(Tensor(x[:, -1])),
    }
    out = interleaved_best({**parts, "forward_cached step": step}, repeats)
    total = out.pop("forward_cached step")
    out["rest (Python, wrappers, checks, allocations)"] = total - sum(out.values())
    out["forward_cached step"] = total
    n = 33
    stream_s = []
    for _ in range(max(2, repeats // 5)):  # the generator per token, its prefill excluded
        stamps = [time.perf_counter() for _ in stream(model, prompt[:position - n + 1] if position >= n
                                                       else prompt[:1], n, SamplingParams(temperature=0))]
        stream_s.append((stamps[-1] - stamps[0]) / (n - 1))
    logits = step()[0]
    decoder = SequenceDecoder(prompt, 1 << 30, SamplingParams(temperature=0), context=1 << 30)
    out["decoder: SequenceDecoder.step, greedy"] = best(lambda: decoder.step(logits), repeats)
    gen = np.random.default_rng(0)
    for name, params in (("t=0.8 top-k 40 top-p 0.95", SamplingParams(temperature=0.8, top_k=40, top_p=0.95)),
                         ("t=0.8 top-p 0.9", SamplingParams(temperature=0.8, top_p=0.9))):
        out[f"sampling: select_next {name}"] = best(lambda: select_next(logits, params, gen), repeats)
    out["stream per token"] = min(stream_s)
    return out


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one step reads: every matrix and vector once, one row of wpe."""
    from numgpt.core import quant

    wpe = model.wpe.weight.data
    return quant.weight_bytes(model)["total"] - wpe.nbytes + wpe[0].nbytes


def child(args) -> int:
    """One thread count: build the models, profile both, print the table."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.child)  # before NumPy loads
    import numpy as np  # noqa: F401

    from machine import read_bandwidth
    from numgpt.core import quant
    from numgpt.core.config import GPTConfig
    from numgpt.core.kernels import compile_all, set_threads
    from numgpt.core.model import GPT

    set_threads(args.child)
    compile_all()
    shape = QUICK_SHAPE if args.quick else SHAPE
    f32 = GPT(GPTConfig(**shape), seed=0)
    q8 = quant.quantize_model(GPT(GPTConfig(**shape), seed=0))
    results = {"float32": profile(f32, args.position, args.repeats),
               "q8_0": profile(q8, args.position, args.repeats)}
    bw = read_bandwidth(256 if args.quick else 1024, repeats=3, threads=args.child)
    nbytes = {"float32": weight_bytes_per_token(f32), "q8_0": weight_bytes_per_token(q8)}
    print(f"\n### {args.child} thread(s); one token at position {args.position}; best of "
          f"{args.repeats}; ms per token\n")
    print(f"| part | float32 | q8_0 |\n|---|---|---|")
    for name in results["float32"]:
        print(f"| {name} | {1e3 * results['float32'][name]:.3f} | {1e3 * results['q8_0'][name]:.3f} |")
    floors = {k: v / (bw * 1e9) for k, v in nbytes.items()}
    print(f"| floor: weight bytes / read bandwidth | {1e3 * floors['float32']:.3f} | "
          f"{1e3 * floors['q8_0']:.3f} |")
    print(f"\nread bandwidth {bw:.1f} GB/s ({args.child}-thread sweep); weights read per token: "
          f"float32 {nbytes['float32'] / 1e6:.0f} MB, q8_0 {nbytes['q8_0'] / 1e6:.0f} MB; "
          f"step / floor: float32 {results['float32']['forward_cached step'] / floors['float32']:.2f}x, "
          f"q8_0 {results['q8_0']['forward_cached step'] / floors['q8_0']:.2f}x")
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child is not None:
        return child(args)
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    from machine import cpu_model, gemm_library

    print(f"CPU {cpu_model()}, {os.cpu_count()} cores visible; GEMM library {gemm_library()}; "
          f"load average {os.getloadavg()[0]:.1f} at the start (the best of repeats is reported: "
          f"other processes may share the CPUs)")
    for n in [int(t) for t in args.threads.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--position",
               str(args.position), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd).returncode:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
