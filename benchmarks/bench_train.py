"""Training speed: numgpt's training step against a PyTorch (eager) nanoGPT, side by side.

Two measurements, both in this one process with the same thread count for numpy's BLAS and
for torch, the two implementations interleaved in chunks so a noisy neighbour slows both
alike:

1. nanoGPT's CPU Shakespeare recipe (its README's "I only have a macbook" run), characters
   as bytes: 4 layers, 4 heads, 128 wide, block 64, batch 12, no biases, exact GELU, tied
   head, dropout 0, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices and
   embeddings, clipping at 1.0), 100 warmup steps then cosine to 1e-4 at step 2000, on
   ``../shared/data/tinyshakespeare.txt`` split 90/10 by ``numgpt.io.data.prepare``. Both
   models start from the same weights and see the same batches; the numgpt side is the
   real loop step (``numgpt.train.loop.train_step``). Targets: numgpt's final validation loss
   <= 1.89 and its time per iteration below PyTorch's.
2. The same model with GPT-2's padded vocabulary (50304) on random token batches: one
   training step (forward, backward, clip, AdamW). Target: at least 1.5x faster.

The PyTorch side is a nanoGPT-style model written here (``TorchGPT``): ``nn.Linear``,
``F.scaled_dot_product_attention(is_causal=True)``, ``F.gelu``, ``F.cross_entropy``,
``torch.optim.AdamW`` with the same two groups and ``clip_grad_norm_``.

A third side, ``torch.compile`` of the same PyTorch model (inductor, default mode), runs
unless ``--no-compile``; its compile time is reported and left out of the step times (the
first 3 steps of each side are warm-up). numgpt runs the op path ``--kernels`` (default fast:
the compiled kernels and the fused flat-buffer AdamW). Targets (issue 11): recipe >= 1.5x
PyTorch eager and faster than torch.compile; vocabulary-50304 step >= 1.3x eager.

    python benchmarks/bench_train.py [--quick] [--threads N] [--workers W] [--iters 2000]

``--quick`` runs 200 recipe iterations and 5 big-vocab steps and writes nothing unless
``--out`` is given; the full run writes its section of ``docs/results/bench_train.md``: one
section per CPU, core count and worker count (``machine.write_cpu_section``), so a run on
another CPU or with other ``--threads``/``--workers`` keeps the others' figures.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "bench_train.md"
TITLE = "Training speed: numgpt vs PyTorch eager (nanoGPT-style), side by side"
INTRO = ("One section per CPU, core count and numgpt worker count measured (a result on one "
         "vendor says little about the other); `python benchmarks/bench_train.py` replaces only "
         "the section of its own CPU and counts.")
SHAKESPEARE = Path(os.environ.get("NUMGPT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "tinyshakespeare.txt"
VAL_TARGET = 1.89
RECIPE_TARGET = 1.5
BIG_VOCAB_TARGET = 1.3


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="cores for each side: torch's intra-op threads, and numgpt's workers x BLAS "
                        "threads (default: every core)")
    p.add_argument("--workers", type=int, default=None,
                   help="numgpt data-parallel workers (numgpt.train.loop.DataParallel); numpy's BLAS gets "
                        "threads // workers threads (default: 1 worker, all threads to BLAS)")
    p.add_argument("--iters", type=int, default=2000, help="recipe iterations (default 2000)")
    p.add_argument("--chunk", type=int, default=25, help="steps per interleaved chunk")
    p.add_argument("--big-steps", type=int, default=12, help="timed big-vocab steps per side")
    p.add_argument("--eval-iters", type=int, default=200, help="val batches of the final loss")
    p.add_argument("--quick", action="store_true", help="200 iterations, 5 big-vocab steps")
    p.add_argument("--skip-recipe", action="store_true", help="only the big-vocab step")
    p.add_argument("--skip-big", action="store_true", help="only the recipe")
    p.add_argument("--kernels", choices=["fast", "reference"], default="fast",
                   help="numgpt's op path (default fast)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile side")
    p.add_argument("--out", default=None, help=f"markdown results (default {RESULTS.relative_to(ROOT)} "
                                               "for a full run; --quick writes nothing unless given)")
    args = p.parse_args(argv)
    args.workers = args.workers or 1
    if not 1 <= args.workers <= args.threads:
        p.error(f"--workers must be in [1, --threads={args.threads}]")
    if args.quick:
        args.iters, args.big_steps, args.eval_iters = min(args.iters, 200), 5, 50
    elif args.out is None:
        args.out = str(RESULTS)
    return args


# ----------------------------------------------------------------------------- torch

def _torch_model_class():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self, C, nh):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C, bias=False)
            self.c_proj = nn.Linear(C, C, bias=False)
            self.nh = nh

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q = q.view(B, T, self.nh, C // self.nh).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.nh, C // self.nh).transpose(1, 2)
            v = v.view(B, T, self.nh, C // self.nh).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self, C):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C, bias=False)
            self.c_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, C, nh):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, bias=False)
            self.attn = Attention(C, nh)
            self.ln_2 = nn.LayerNorm(C, bias=False)
            self.mlp = MLP(C)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        """nanoGPT's GPT without biases; the head is tied to ``wte``."""

        def __init__(self, V, T, L, nh, C):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(T, C)
            self.h = nn.ModuleList([Block(C, nh) for _ in range(L)])
            self.ln_f = nn.LayerNorm(C, bias=False)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # (B, T, V)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return TorchGPT


def _torch_from(numgpt_model, threads: int):
    """A TorchGPT holding exactly numgpt_model's weights (Linear (in, out) -> (out, in))."""
    import torch

    torch.set_num_threads(threads)
    c = numgpt_model.config
    m = _torch_model_class()(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd)
    ours = numgpt_model.parameters()
    with torch.no_grad():
        for name, p in m.named_parameters():
            w = ours[name].data
            p.copy_(torch.from_numpy(w.T.copy() if (name.endswith(".weight") and ".c_" in name) else w.copy()))
    decay = [p for p in m.parameters() if p.dim() >= 2]
    no_decay = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), foreach=True)
    return m, opt


def _torch_step(m, opt, x, y, lr: float) -> float:
    import torch

    for g in opt.param_groups:
        g["lr"] = lr
    loss = m(torch.from_numpy(x), torch.from_numpy(y))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    return loss.item()


def _torch_eval(m, data, B, T, iters, seed) -> float:
    import numpy as np
    import torch

    from numgpt.io.data import get_batch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        return float(np.mean([float(m(*(torch.from_numpy(a) for a in get_batch(data, B, T, rng))))
                              for _ in range(iters)]))


# ----------------------------------------------------------------------------- numgpt

_KERNELS = "fast"  # numgpt's op path (set in main from --kernels)


def _numgpt_model(V: int, seed: int = 1337):
    from numgpt.core.model import GPT, GPTConfig
    from numgpt.train.optim import AdamW

    m = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False,
                      dropout=0.0, activation="gelu", dtype="float32", kernels=_KERNELS), seed=seed)
    return m, AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, kernels=_KERNELS)


def _sides(ours, opt, args) -> dict:
    """name -> (model, optimizer, step function): numgpt, torch eager, torch.compile."""
    theirs, topt = _torch_from(ours, args.threads)
    sides = {"numgpt": (ours, opt, _numgpt_step), "torch": (theirs, topt, _torch_step)}
    if not args.no_compile:
        import torch

        compiled, copt = _torch_from(ours, args.threads)
        sides["torch.compile"] = (torch.compile(compiled), copt, _torch_step)
    return sides


_PARALLEL = None  # numgpt.train.loop.DataParallel when --workers > 1 (set in main)


def _numgpt_step(m, opt, x, y, lr: float) -> float:
    from numgpt.train.loop import train_step

    return train_step(m, opt, [(x, y)], lr=lr, grad_clip=1.0, parallel=_PARALLEL).loss


# ----------------------------------------------------------------------------- runs

def _interleaved(sides: dict, n_steps: int, chunk: int, batch_for, lr_for, on_chunk=None) -> dict:
    """Run ``n_steps`` steps of every side, ``chunk`` at a time in turn; per-step wall times."""
    times = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for start in range(0, n_steps, chunk):
        for name, (model, opt, step) in sides.items():
            for it in range(start, min(start + chunk, n_steps)):
                x, y = batch_for(it)
                t0 = time.perf_counter()
                losses[name].append(step(model, opt, x, y, lr_for(it)))
                times[name].append(time.perf_counter() - t0)
        if on_chunk:
            on_chunk(min(start + chunk, n_steps), losses)
    return {"times": times, "losses": losses}


def run_recipe(args) -> dict:
    import numpy as np

    from numgpt.io.data import TokenDataset, get_batch, prepare
    from numgpt.train.optim import get_lr
    from numgpt.io.tokenizer import ByteTokenizer
    from numgpt.train.loop import estimate_loss

    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} not found; set NUMGPT_SHARED_DATA to the folder holding tinyshakespeare.txt")
    tmp = tempfile.mkdtemp(prefix="numgpt-bench-")
    prepare([SHAKESPEARE], ByteTokenizer(), tmp, val_fraction=0.1, progress=False)
    ds = TokenDataset(tmp)
    B, T = 12, 64
    ours, opt = _numgpt_model(256)
    sides = _sides(ours, opt, args)
    rng = np.random.default_rng(1337)
    batches = [get_batch(ds.train, B, T, rng) for _ in range(args.iters)]  # the same for both
    lr_for = lambda it: get_lr(it, learning_rate=1e-3, warmup_iters=100, lr_decay_iters=2000,  # noqa: E731
                               min_lr=1e-4)

    def report(done, losses):
        tail = {k: statistics.fmean(v[-args.chunk:]) for k, v in losses.items()}
        print(f"  iter {done:5d}: loss numgpt {tail['numgpt']:.4f}  torch {tail['torch']:.4f}", flush=True)

    print(f"recipe: {args.iters} iterations, chunks of {args.chunk}, {args.threads} threads", flush=True)
    t0 = time.perf_counter()
    res = _interleaved(sides, args.iters, args.chunk, lambda it: batches[it], lr_for,
                       report if args.iters >= 100 else None)
    res["wall"] = time.perf_counter() - t0
    res["times"] = {k: v[3:] for k, v in res["times"].items()}  # warm-up (and compiling) left out
    res["val"] = {"numgpt": estimate_loss(ours, ds.val, B, T, args.eval_iters, 0)}
    for name in ("torch", "torch.compile"):
        if name in sides:
            res["val"][name] = _torch_eval(sides[name][0], ds.val, B, T, args.eval_iters, 0)
    return res


def run_big_vocab(args) -> dict:
    import numpy as np

    V, B, T = 50304, 12, 64
    ours, opt = _numgpt_model(V)
    sides = _sides(ours, opt, args)
    rng = np.random.default_rng(0)
    n = args.big_steps + 3  # the first three of each side are warm-up (and compiling)
    batches = [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)]
    print(f"big vocab: {args.big_steps} timed steps per side (+3 warm-up), V={V}", flush=True)
    res = _interleaved(sides, n, 1, lambda it: batches[it], lambda it: 1e-3)
    res["times"] = {k: v[3:] for k, v in res["times"].items()}
    return res


# ----------------------------------------------------------------------------- report

def _stats(times: list[float]) -> dict:
    return {"median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times)}


def _table(rows, header) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


_MACHINE = None  # machine.Machine, measured in main


def report(args, recipe: dict | None, big: dict | None) -> str:
    import numpy as np
    import torch

    lines = [f"Written by `benchmarks/bench_train.py` (numpy {np.__version__}, torch {torch.__version__}, "
             f"{args.threads} cores each: torch {args.threads} intra-op threads, numgpt "
             f"{args.workers} worker(s) x {max(1, args.threads // args.workers)} BLAS thread(s); "
             f"numgpt kernels={args.kernels}; {_MACHINE.describe()}). Times are wall-clock per training step "
             f"(forward, backward, clip, AdamW), the two implementations interleaved in chunks.", ""]
    tag = (f"{args.threads} core(s): torch {args.threads} thread(s), numgpt {args.workers} worker(s) x "
           f"{max(1, args.threads // args.workers)} BLAS thread(s)")
    if recipe:
        n = _stats(recipe["times"]["numgpt"])
        rows = [[name, f"{1e3 * st['median']:.1f}", f"{1e3 * st['mean']:.1f}", f"{1e3 * st['min']:.1f}",
                 f"{recipe['losses'][name][-1]:.4f}", f"{recipe['val'][name]:.4f}",
                 f"{st['median'] / n['median']:.2f}x"]
                for name, st in ((k, _stats(v)) for k, v in recipe["times"].items())]
        val_ok = recipe["val"]["numgpt"] <= VAL_TARGET
        lines += [f"### nanoGPT CPU Shakespeare recipe, {args.iters} iterations; {tag}", "",
                  *_table(rows, ["implementation", "median ms/iter", "mean ms/iter", "min ms/iter",
                                 "last train loss", f"final val loss ({args.eval_iters} batches)",
                                 "its median / numgpt's"]), ""]
        for name, target in (("torch", RECIPE_TARGET), ("torch.compile", 1.0)):
            if name in recipe["times"]:
                ratio = _stats(recipe["times"][name])["median"] / n["median"]
                lines.append(f"- speed: {name} / numgpt = **{ratio:.2f}x** by median (target "
                             f"{'>=' if target > 1 else '>'} {target:.2f}x: "
                             f"{'met' if (ratio >= target if target > 1 else ratio > target) else 'NOT met'})")
        lines += [f"- numgpt final val loss **{recipe['val']['numgpt']:.4f}** (target <= {VAL_TARGET}: "
                  f"{'met' if val_ok else 'NOT met'}{'' if args.iters >= 2000 else '; a short run cannot reach it'})",
                  f"- whole interleaved run: {recipe['wall']:.0f} s (including torch.compile's compile time)", ""]
    if big:
        n = _stats(big["times"]["numgpt"])
        rows = [[name, f"{1e3 * st['median']:.0f}", f"{1e3 * st['mean']:.0f}", f"{1e3 * st['min']:.0f}",
                 f"{st['median'] / n['median']:.2f}x"]
                for name, st in ((k, _stats(v)) for k, v in big["times"].items())]
        ratio = _stats(big["times"]["torch"])["median"] / n["median"]
        lines += [f"### One step with vocabulary 50304 (4 layers, 128 wide, block 64, batch 12); {tag}", "",
                  *_table(rows, ["implementation", "median ms/step", "mean ms/step", "min ms/step",
                                 "its median / numgpt's"]), "",
                  f"- speed: torch / numgpt = **{ratio:.2f}x** by median (target >= {BIG_VOCAB_TARGET}x: "
                  f"{'met' if ratio >= BIG_VOCAB_TARGET else 'NOT met'})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    global _PARALLEL
    args = _parse(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from numgpt.core.threads import set_blas_threads

    # before NumPy loads: each numgpt worker gets its share of BLAS threads; torch's
    # intra-op pool (OMP_NUM_THREADS) gets all of them
    set_blas_threads(max(1, args.threads // args.workers), openmp=args.threads)
    from numgpt.train.loop import DataParallel, keep_freed_memory
    from machine import Machine

    global _KERNELS, _MACHINE
    _KERNELS = args.kernels
    _MACHINE = Machine.measure(max(1, args.threads // args.workers), quick=args.quick)
    print(_MACHINE.describe(), flush=True)

    keep_freed_memory()  # what numgpt.train.loop.train does; torch's CPU allocator is malloc too
    _PARALLEL = DataParallel(args.workers) if args.workers > 1 else None
    recipe = None if args.skip_recipe else run_recipe(args)
    big = None if args.skip_big else run_big_vocab(args)
    text = report(args, recipe, big)
    print()
    print(text)
    if args.out:  # this CPU's (and counts') section; the other sections stay
        from machine import write_cpu_section

        section = f"{_MACHINE.cpu}, {args.threads} core(s), {args.workers} numgpt worker(s)"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_cpu_section(args.out, TITLE, INTRO, section, text)
        print(f"\nwritten to {args.out} (section {section!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
