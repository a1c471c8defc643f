"""Data-parallel training across processes: numgpt on MPI ranks against one process and
against PyTorch DistributedDataParallel (gloo), side by side in one run.

Three ways to run the same training step (forward, backward, gradient sum, clip at 1.0,
AdamW) on the same global batch of 12 rows, every process with ONE thread (numpy's BLAS
and torch's intra-op pool):

* ``numgpt 1 process``: ``train_step`` on all 12 rows;
* ``numgpt 2 ranks``: ``mpiexec -n 2``, each rank 6 rows, gradients summed by one
  allreduce over one contiguous buffer (``numgpt.train.parallel``);
* ``torch DDP 2 ranks``: ``torchrun --nproc_per_node 2``, the nanoGPT-style ``TorchGPT`` of
  ``bench_train.py`` wrapped in ``DistributedDataParallel`` with the gloo backend, each rank
  6 rows (DDP overlaps its bucketed allreduces with backward, so it has no separate time).

Two workloads: the ``gpt`` preset of ``bench_train.py``'s big-vocabulary step (4 layers, 128
wide, block 64, vocabulary 50304, 7.2M parameters) on random tokens, and nanoGPT's
Shakespeare-char recipe (the same model with the 256 byte vocabulary) on
``../shared/data/tinyshakespeare.txt``. Each side runs in its own processes; the sides take
turns for ``--rounds`` rounds so a noisy neighbour slows all alike; the first
``--warmup`` steps of every process are not timed. Targets: 2 ranks >= 1.8x one process
on the gpt preset; 2 numgpt ranks faster than torch DDP.

The script also reports the allreduce time per step and its share of the step, and works
out on paper what that share would be for GPT-2 124M across two machines on a 10 Gbit/s
link, from this run's measured compute rate (printed step by step).

    python benchmarks/bench_mpi.py [--quick] [--rounds R] [--steps N]

``--quick`` (3 timed steps, 1 round) proves the script works and writes nothing; the full
run writes this CPU's section of ``docs/results/bench_mpi.md`` (``machine.write_cpu_section``:
another CPU's section stays). Run it on quiet cores: the numbers mean nothing
when other work shares the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "bench_mpi.md"
TITLE = "Data-parallel training: numgpt on MPI ranks vs one process vs PyTorch DDP (gloo)"
INTRO = ("One section per CPU measured (a result on one vendor says little about the other); "
         "`python benchmarks/bench_mpi.py` on a CPU replaces only that CPU's section.")
SHAKESPEARE = Path(os.environ.get("NUMGPT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "tinyshakespeare.txt"
GLOBAL_ROWS, T = 12, 64
VOCAB = {"gpt": 50304, "recipe": 256}
SCALING_TARGET = 1.8
LINK_BITS_PER_S = 10e9
GPT2_124M = dict(params=124_439_808, n_layer=12, n_embd=768, block=1024)  # tied head


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per process (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per process")
    p.add_argument("--rounds", type=int, default=3, help="turns each side takes (default 3)")
    p.add_argument("--workloads", default="gpt,recipe", help="comma list of gpt, recipe")
    p.add_argument("--quick", action="store_true", help="3 timed steps, 1 round, writes nothing")
    p.add_argument("--out", default=None, help="markdown results (default docs/results/bench_mpi.md "
                                               "for a full run; --quick writes nothing unless given)")
    p.add_argument("--role", choices=["numgpt", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=list(VOCAB), help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 3, 1, 1
    elif args.out is None:
        args.out = str(RESULTS)
    return args


# ----------------------------------------------------------------------------- one side (a worker)

def _batches(args, n: int) -> list:
    """``n`` global batches of (12, 64) ids, the same in every process (seeded)."""
    import numpy as np

    rng = np.random.default_rng(0)
    if args.workload == "recipe":
        from numgpt.io.data import TokenDataset, get_batch

        data = TokenDataset(args.data).train
        return [get_batch(data, GLOBAL_ROWS, T, rng) for _ in range(n)]
    V = VOCAB["gpt"]
    return [(rng.integers(0, V, (GLOBAL_ROWS, T)), rng.integers(0, V, (GLOBAL_ROWS, T))) for _ in range(n)]


def numgpt_worker(args) -> None:
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(1, warn=False)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import _numgpt_model
    from numgpt.train.loop import keep_freed_memory, train_step
    from numgpt.train.parallel import DataParallel, ranks_from_environment

    keep_freed_memory()
    ranks = ranks_from_environment(600)
    model, opt = _numgpt_model(VOCAB[args.workload])
    opt = _train_optimizer(model)
    parallel = DataParallel(1, ranks)
    times, reduce = [], []
    for i, (x, y) in enumerate(_batches(args, args.warmup + args.steps)):
        before = parallel.reduce_seconds
        t0 = time.perf_counter()
        train_step(model, opt, [(x, y)], lr=1e-3, grad_clip=1.0, parallel=parallel)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            reduce.append(parallel.reduce_seconds - before)
    params = sum(p.data.size for p in model.parameters().values())
    alone = _allreduce_alone(ranks, params, args.steps) if ranks.size > 1 else []
    if ranks.is_root:
        print("RESULT " + json.dumps({"times": times, "reduce": reduce, "alone": alone,
                                      "params": params, "ranks": ranks.size}), flush=True)


def _train_optimizer(model):
    """AdamW as ``numgpt train`` builds it (its default kernels path where the config has one)."""
    from numgpt.train.config import TrainConfig
    from numgpt.train.optim import AdamW

    kernels = getattr(TrainConfig(), "kernels", None)
    return AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                 **({"kernels": kernels} if kernels else {}))


def _allreduce_alone(ranks, params: int, repeats: int) -> list[float]:
    """The gradient allreduce by itself: a barrier first, so no rank waits for a slower one
    (inside a step the allreduce time also holds that wait)."""
    import numpy as np

    buffer = np.ones(params, dtype=np.float32)
    out = []
    for _ in range(repeats):
        ranks.comm.Barrier()
        t0 = time.perf_counter()
        ranks.sum(buffer, "the timed allreduce")
        out.append(time.perf_counter() - t0)
    return out


def torch_worker(args) -> None:
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import _numgpt_model, _torch_from, _torch_step

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    ours, _ = _numgpt_model(VOCAB[args.workload])
    model, opt = _torch_from(ours, 1)
    ddp = DistributedDataParallel(model)
    share = GLOBAL_ROWS // size
    rows = slice(rank * share, (rank + 1) * share)
    times = []
    for i, (x, y) in enumerate(_batches(args, args.warmup + args.steps)):
        t0 = time.perf_counter()
        _torch_step(ddp, opt, x[rows], y[rows], 1e-3)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print("RESULT " + json.dumps({"times": times, "ranks": size, "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the orchestra

def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if not found:
        sys.exit("no mpiexec next to this Python or on PATH: pip install 'numgpt[mpi]'")
    return found


def _side(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_workload(args, workload: str, data: str | None) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--workload", workload, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--data", data] if data else []
    sides = {
        "numgpt 1 process": me + ["--role", "numgpt", *common],
        "numgpt 2 ranks": [_mpiexec(), "-n", "2", *me, "--role", "numgpt", *common],
        "torch DDP 2 ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(Path(__file__).resolve()),
                              "--role", "torch", *common],
    }
    out = {name: {"times": [], "reduce": [], "alone": []} for name in sides}
    for r in range(args.rounds):
        for name, cmd in sides.items():
            res = _side(cmd)
            out[name]["times"] += res["times"]
            out[name]["reduce"] += res.get("reduce", [])
            out[name]["alone"] += res.get("alone", [])
            out[name]["params"] = res.get("params", out[name].get("params"))
            print(f"  {workload} round {r + 1}/{args.rounds} {name}: median "
                  f"{1e3 * statistics.median(res['times']):.1f} ms/step", flush=True)
    return out


def _prepare_recipe() -> str | None:
    if not SHAKESPEARE.is_file():
        print(f"recipe skipped: {SHAKESPEARE} not found (set NUMGPT_SHARED_DATA)", flush=True)
        return None
    from numgpt.io.data import prepare
    from numgpt.io.tokenizer import ByteTokenizer

    folder = tempfile.mkdtemp(prefix="numgpt-bench-mpi-")
    prepare([SHAKESPEARE], ByteTokenizer(), folder, val_fraction=0.1, progress=False)
    return folder


# ----------------------------------------------------------------------------- report

def _flops_per_token(params: int, n_layer: int, n_embd: int, block: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4; the tied head counts
    once as a matmul) plus attention's 12 * layers * block * width (PaLM appendix B)."""
    return 6 * params + 12 * n_layer * block * n_embd


def extrapolation(gpt: dict) -> list[str]:
    """GPT-2 124M on two machines over 10 Gbit/s, from this run's measured numbers."""
    one = statistics.median(gpt["numgpt 1 process"]["times"])
    two = gpt["numgpt 2 ranks"]
    reduce = statistics.median(two["alone"])
    params = gpt["numgpt 1 process"]["params"]
    rate = GLOBAL_ROWS * T * _flops_per_token(params, 4, 128, T) / one  # FLOP/s of one core
    local_bw = params * 4 / reduce if reduce > 0 else float("nan")
    g = GPT2_124M
    bytes_per_rank = 2 * (2 - 1) / 2 * g["params"] * 4  # ring allreduce: 2 (N-1)/N of the buffer
    comm = bytes_per_rank * 8 / LINK_BITS_PER_S
    lines = [f"- measured on this machine: one process runs the gpt preset at {rate / 1e9:.2f} GFLOP/s "
             f"({GLOBAL_ROWS} x {T} tokens x {_flops_per_token(params, 4, 128, T) / 1e6:.1f} MFLOP/token "
             f"in {1e3 * one:.0f} ms); the 2-rank allreduce moves {params * 4 / 1e6:.1f} MB in "
             f"{1e3 * reduce:.1f} ms ({local_bw / 1e9:.2f} GB/s through shared memory)",
             f"- GPT-2 124M ({g['params'] / 1e6:.1f}M parameters, float32) on 2 machines over a 10 Gbit/s "
             f"link: a ring allreduce sends 2 (N-1)/N x {g['params'] * 4 / 1e6:.0f} MB = "
             f"{bytes_per_rank / 1e6:.0f} MB per rank per step = **{comm:.2f} s** (no overlap: numgpt "
             f"reduces once after backward); one rank per machine computing at the one-core rate "
             f"measured here"]
    for rows in (6, 240):  # one micro-batch of 6 sequences per rank; nanoGPT's 0.5M-token batch
        tokens = rows * g["block"]
        compute = tokens * _flops_per_token(g["params"], g["n_layer"], g["n_embd"], g["block"]) / rate
        lines.append(f"  - {rows} sequences of {g['block']} tokens per rank per step: compute "
                     f"{tokens:,} x {_flops_per_token(g['params'], g['n_layer'], g['n_embd'], g['block']) / 1e9:.2f} "
                     f"GFLOP / {rate / 1e9:.2f} GFLOP/s = {compute:.0f} s per core, communication share "
                     f"**{100 * comm / (comm + compute):.2f}%**")
    return lines


def report(args, results: dict) -> str:
    import numpy as np

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    from machine import cpu_model, gemm_library

    lines = [f"Written by `benchmarks/bench_mpi.py` (numpy {np.__version__}; CPU {cpu_model()}, "
             f"{os.cpu_count()} cores visible; GEMM library {gemm_library()}; "
             f"load average {load:.1f} at the end). Global batch {GLOBAL_ROWS} x {T} tokens per step, "
             f"every process one thread; {args.steps} timed steps per process after {args.warmup} "
             f"untimed, {args.rounds} round(s) taking turns. Milliseconds per step (forward, backward, "
             f"gradient sum, clip, AdamW).", ""]
    for workload, res in results.items():
        one = statistics.median(res["numgpt 1 process"]["times"])
        two = statistics.median(res["numgpt 2 ranks"]["times"])
        ddp = statistics.median(res["torch DDP 2 ranks"]["times"])
        reduce = statistics.median(res["numgpt 2 ranks"]["reduce"])
        title = ("gpt preset (4 layers, 128 wide, block 64, vocabulary 50304)" if workload == "gpt"
                 else "Shakespeare-char recipe (4 layers, 128 wide, block 64, bytes)")
        alone = statistics.median(res["numgpt 2 ranks"]["alone"])
        rows = [[name, f"{1e3 * statistics.median(r['times']):.1f}", f"{1e3 * min(r['times']):.1f}",
                 f"{1e3 * statistics.median(r['reduce']):.1f}" if r["reduce"] and "ranks" in name else "-",
                 f"{1e3 * statistics.median(r['alone']):.1f}" if r["alone"] else "-"]
                for name, r in res.items()]
        lines += [f"### {title}", "", "| side | median ms/step | min ms/step | allreduce in the step "
                  "(ms, incl. waiting for the slower rank) | allreduce alone (ms, after a barrier) |",
                  "|---|---|---|---|---|", *["| " + " | ".join(r) + " |" for r in rows], ""]
        scaling_line = f"- scaling: 1 process / 2 ranks = **{one / two:.2f}x**"
        if workload == "gpt":
            scaling_line += (f" (target >= {SCALING_TARGET}x: "
                             f"{'met' if one / two >= SCALING_TARGET else 'NOT met'})")
        lines += [scaling_line,
                  f"- vs torch DDP (gloo) at 2 ranks: torch / numgpt = **{ddp / two:.2f}x** "
                  f"(target > 1: {'met' if ddp > two else 'NOT met'})",
                  f"- allreduce: {1e3 * reduce:.1f} ms per step inside the step, **{100 * reduce / two:.1f}%** "
                  f"of the 2-rank step; alone {1e3 * alone:.1f} ms, **{100 * alone / two:.1f}%**",
                  ""]
    if "gpt" in results:
        lines += ["### On paper: GPT-2 124M across two machines on 10 Gbit/s", "",
                  *extrapolation(results["gpt"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.role == "numgpt":
        numgpt_worker(args)
        return 0
    if args.role == "torch":
        torch_worker(args)
        return 0
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))  # machine.py
    from machine import cpu_model, gemm_library, write_cpu_section

    print(f"CPU {cpu_model()}, {os.cpu_count()} cores visible; GEMM library {gemm_library()}", flush=True)
    results = {}
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        data = _prepare_recipe() if workload == "recipe" else None
        if workload == "recipe" and data is None:
            continue
        print(f"{workload}: {args.rounds} round(s) x 3 sides x {args.steps} timed steps", flush=True)
        results[workload] = run_workload(args, workload, data)
    text = report(args, results)
    print()
    print(text)
    if args.out:  # this CPU's section; the other CPUs' sections stay
        write_cpu_section(str(args.out), TITLE, INTRO, cpu_model(), text)
        print(f"\nwritten to {args.out} (section {cpu_model()!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
