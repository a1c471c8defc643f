"""Serving at the memory-bandwidth limit (issue 18): numgpt serve beside llama-server.

Starts the real ``numgpt serve`` in a subprocess on a free loopback port for each model
(random weights with GPT-2's vocabulary, saved to a temporary folder; its BPE files ship
with numgpt), and ``llama-server -np 16`` on the same weights written as a GGUF by numgpt
(``--llama-bin DIR``, default: the folder of ``llama-server`` on PATH; without it those rows
are skipped and the notes say why). Both get the same --threads. Four tables:

* throughput: aggregate generated tokens/s of 1, 4 and 16 concurrent streaming clients
  (server-sent events), float32 and q8_0, GPT-2 124M and medium (medium: 1 and 16 clients,
  fewer tokens). Targets at 16 clients (124M): >= 1.5x llama-server in float32, >= 1.2x in
  q8_0, and >= 8x one client.
* mixed load: 15 clients stream, then a 1000-token prompt arrives: the streams' p50 and p99
  inter-token latency (from the clients' own clocks) and the newcomer's time to first token.
  Target: p99 within 2x p50 (numgpt reads the prompt in --prefill-chunk pieces while the
  streams keep decoding); numgpt runs it at the default chunk and at 256, the trade between
  the streams' latency and the newcomer's.
* prefix reuse: a request sharing a 900-token prefix with the one before it, against one
  whose 900 tokens were never seen: time to first token of each (best of 3). Target >= 5x.
* one step: the time of one 16-row decode step (``GPT.forward_packed``, in this process,
  best of 20) against max(weight bytes / read bandwidth, FLOPs / GEMM peak), both measured
  in this run (``benchmarks/machine.py``). Target: within 1.5x.

    python benchmarks/bench_server.py [--tokens 32] [--threads 1] [--skip-medium] [--llama-bin DIR]
    python benchmarks/bench_server.py --quick   # proves the script works in well under a
                                                # minute: a 2-layer model, nothing written

Writes this CPU's section of ``docs/results/bench_server.md`` (other CPUs' sections stay).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CLIENTS = (1, 4, 16)
SLOTS = max(CLIENTS)
TARGETS = {"f32": 1.5, "q8_0": 1.2}  # numgpt / llama-server at 16 clients, 124M
SCALING_TARGET = 8.0  # 16 clients >= 8x one client (float32, 124M)
LATENCY_TARGET = 2.0  # the streams' p99 inter-token latency <= 2x their p50
REUSE_TARGET = 5.0  # time to first token without / with a reused 900-token prefix
STEP_TARGET = 1.5  # one 16-row step <= 1.5x max(bytes / bandwidth, FLOPs / peak)
LARGE_CHUNK = 256  # the mixed load again with this --prefill-chunk, beside the default
RESULTS = REPO / "docs" / "results" / "bench_server.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``numgpt serve`` in a subprocess, terminated on exit."""

    name = "numgpt"

    def __init__(self, model: Path, threads: int | None, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "numgpt", "serve", "--model", str(model), "--port",
               str(self.port), "--max-batch", str(SLOTS), "--max-queue", "64",
               "--log-level", "info", *flags]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.output())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def batch_max(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("numgpt_decode_batch_size_max "))
        return float(line.split()[1])


class LlamaServer(Server):
    """``llama-server -np 16`` on a GGUF (same health check and exit); each slot has room
    for the 1000-token prompt."""

    name = f"llama-server -np {SLOTS}"

    def __init__(self, binary: str, gguf: Path, threads: int | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [binary, "-m", str(gguf), "--port", str(self.port), "-np", str(SLOTS),
               "-c", str(SLOTS * 1024), "--log-disable"]
        cmd += ["-t", str(threads)] if threads else []
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def batch_max(self) -> float:
        return float("nan")  # llama-server has no such metric


# ------------------------------------------------------------------------- clients


def _stream(url: str, prompt, max_tokens: int, seed: int,
            stamps: list[float] | None = None) -> tuple[float, list[float]]:
    """One streaming completion: (time sent, arrival time of each token chunk); the times
    are appended to ``stamps`` as they arrive (others may watch it)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
            "seed": seed}
    stamps = [] if stamps is None else stamps
    with httpx.Client(timeout=600) as h:
        sent = time.perf_counter()
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if json.loads(line[6:])["choices"][0]["finish_reason"] is None:
                    stamps.append(time.perf_counter())
    return sent, stamps


def _clients(url: str, prompts: list, max_tokens: int):
    """Start streaming every prompt at once (a barrier lines them up) -> (threads, out,
    live): out[i] becomes (sent, stamps) when client i ends; live[i] grows as tokens arrive."""
    barrier = threading.Barrier(len(prompts) + 1)
    out: list = [None] * len(prompts)
    live: list[list[float]] = [[] for _ in prompts]

    def run(i):
        barrier.wait()
        out[i] = _stream(url, prompts[i], max_tokens, i, live[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    return threads, out, live


def throughput(url: str, clients: int, max_tokens: int) -> dict:
    """Aggregate tokens/s of ``clients`` simultaneous streaming requests."""
    threads, out, _ = _clients(url, [f"Client {i} says" for i in range(clients)], max_tokens)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError("a client failed; see the traceback above")
    tokens = sum(len(s) for _, s in out)
    elapsed = max(s[-1] for _, s in out if s) - t0
    return {"clients": clients, "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def mixed_load(url: str, streams: int, stream_tokens: int, newcomer_ids: list[int]) -> dict:
    """``streams`` clients stream; once each has a few tokens a long prompt arrives.
    -> the streams' p50/p99 inter-token latency and the newcomer's time to first token."""
    threads, out, live = _clients(url, [f"Stream {i} says" for i in range(streams)], stream_tokens)
    deadline = time.monotonic() + 120
    while min(len(s) for s in live) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # the streams are flowing: a few tokens each
    sent, stamps = _stream(url, newcomer_ids, 1, 999)
    for t in threads:
        t.join()
    gaps = [b - a for _, s in out for a, b in zip(s[1:], s[2:])]  # past each stream's start
    p50, p99 = _percentile(gaps, 0.5), _percentile(gaps, 0.99)
    return {"p50": p50, "p99": p99, "ttft": stamps[0] - sent if stamps else float("nan"),
            "gaps": len(gaps)}


def prefix_reuse(url: str, prefix: int, rest: int, vocab: int, repeats: int) -> dict:
    """Time to first token of a prompt sharing ``prefix`` tokens with the one just before it
    (with reuse) and of one whose prefix was never seen (without), best of ``repeats``."""
    import numpy as np

    rng = np.random.default_rng(7)
    with_, without = [], []
    for _ in range(repeats):
        shared = rng.integers(0, vocab, prefix).tolist()

        def ttft(ids):
            sent, stamps = _stream(url, ids, 1, 0)
            return stamps[0] - sent
        ttft(shared + rng.integers(0, vocab, rest).tolist())  # seeds the cache
        without.append(ttft(rng.integers(0, vocab, prefix + rest).tolist()))
        with_.append(ttft(shared + rng.integers(0, vocab, rest).tolist()))
    return {"with": min(with_), "without": min(without), "ratio": min(without) / min(with_)}


# --------------------------------------------------------------------------- models


def _gpt2_vocab_folder(tmp: Path) -> Path:
    from numgpt.io.tokenizer import PACKAGED_GPT2

    tok_dir = tmp / "gpt2-tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(PACKAGED_GPT2 / name, tok_dir / name)
    return tok_dir


def _model(shape: str, tok_dir: Path):
    from numgpt.core.model import GPT, GPTConfig
    from numgpt.io.tokenizer import GPT2Tokenizer

    config = (GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=1024) if shape == "quick"
              else GPTConfig.preset(shape))
    m = GPT(config, seed=0)
    m.tokenizer = GPT2Tokenizer.from_folder(tok_dir)
    return m


def step_time(model, rows: int, repeats: int) -> float:
    """Best time of one packed decode step of ``rows`` slots, each holding 64 tokens."""
    import numpy as np

    cache = model.new_cache(rows, 128)
    rng = np.random.default_rng(0)
    model.forward_packed([(s, rng.integers(0, 50257, 64)) for s in range(rows)], cache)
    best = float("inf")
    for _ in range(repeats):
        cache.lengths[:] = 64
        t0 = time.perf_counter()
        model.forward_packed([(s, rng.integers(0, 50257, 1)) for s in range(rows)], cache)
        best = min(best, time.perf_counter() - t0)
    return best


def step_profile(model, rows: int, top: int = 5) -> str:
    """Where one packed decode step of ``rows`` slots spends its time: the functions with the
    most time of their own (cProfile, one step after a warm one), as shares of the step."""
    import cProfile
    import pstats

    import numpy as np

    cache = model.new_cache(rows, 128)
    rng = np.random.default_rng(1)
    model.forward_packed([(s, rng.integers(0, 50257, 64)) for s in range(rows)], cache)
    segments = [(s, rng.integers(0, 50257, 1)) for s in range(rows)]
    cache.lengths[:] = 64
    model.forward_packed(segments, cache)
    cache.lengths[:] = 64
    prof = cProfile.Profile()
    prof.enable()
    model.forward_packed(segments, cache)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())
    worst = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return ", ".join(f"{Path(f).name}:{name} {100 * v[2] / total:.0f}%" for (f, _, name), v in worst)


def step_row(label: str, weights: str, model, machine, rows: int, repeats: int) -> dict:
    """One step's time against max(weight bytes / bandwidth, FLOPs / GEMM peak)."""
    from numgpt.core.quant import weight_bytes

    c = model.config
    streamed = weight_bytes(model)["total"] - model.wpe.weight.data.nbytes  # wpe: 1 row per token
    matrix_params = c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd
    read_s = streamed / (machine.bandwidth_gbs * 1e9)
    flop_s = 2 * rows * matrix_params / (machine.gemm_gflops * 1e9)
    t = step_time(model, rows, repeats)
    ratio = t / max(read_s, flop_s)
    return {"model": label, "weights": weights, "rows": rows, "step": t, "bytes": streamed,
            "read": read_s, "flop": flop_s, "ratio": ratio,
            "profile": step_profile(model, rows) if ratio > STEP_TARGET else ""}


# ---------------------------------------------------------------------------- tables


def throughput_table(rows: list[dict]) -> str:
    lines = ["| model | weights | server | clients | tokens | seconds | aggregate tok/s | x 1 client |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights']} | {r['server']} | {r['clients']} | "
                     f"{r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def mixed_table(rows: list[dict]) -> str:
    lines = ["| model | server | prompt read | streams | stream ITL p50 ms | p99 ms | p99 / p50 | "
             "newcomer prompt | newcomer TTFT s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['server']} | {r['chunk']} | {r['streams']} | {1e3 * r['p50']:.1f} | "
                     f"{1e3 * r['p99']:.1f} | {r['p99'] / r['p50']:.2f} | {r['prompt']} | "
                     f"{r['ttft']:.2f} |")
    return "\n".join(lines)


def reuse_table(rows: list[dict]) -> str:
    lines = ["| model | server | shared prefix | TTFT without reuse s | TTFT with reuse s | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['server']} | {r['prefix']} | {r['without']:.3f} | "
                     f"{r['with']:.3f} | {r['ratio']:.1f}x |")
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    lines = ["| model | weights | rows | step ms | weight MB read | bytes / bandwidth ms | "
             "FLOPs / peak ms | step / bound |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights']} | {r['rows']} | {1e3 * r['step']:.1f} | "
                     f"{r['bytes'] / 1e6:.0f} | {1e3 * r['read']:.1f} | {1e3 * r['flop']:.1f} | "
                     f"{r['ratio']:.2f}x |")
    return "\n".join(lines)


def _on_path(binary: str) -> str | None:
    """The folder holding ``binary`` on PATH (None: the llama.cpp rows are skipped)."""
    found = shutil.which(binary)
    return os.path.dirname(found) if found else None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ------------------------------------------------------------------------------ run


def run_model(label: str, model, weights: str, tmp: Path, args, llama: str | None, plan: dict,
              out: dict, notes: list[str]) -> None:
    """Save ``model`` (and its GGUF when llama-server runs), then every table's rows for it."""
    from numgpt.io.checkpoint import save
    from numgpt.io.gguf import write_gguf

    from numgpt.serve.engine import DEFAULT_PREFILL_CHUNK

    tag = f"{label.replace(' ', '-')}-{weights}"
    path = save(model, tmp / tag)
    servers = [("numgpt", DEFAULT_PREFILL_CHUNK, lambda: Server(path, args.threads))]
    if plan.get("mixed"):  # the same mixed load with a larger chunk: the latency it costs
        servers.append(("numgpt", LARGE_CHUNK, lambda: Server(
            path, args.threads, "--prefill-chunk", str(LARGE_CHUNK))))
    if llama:
        gguf = write_gguf(model, tmp / f"{tag}.gguf", weights)
        servers.append((LlamaServer.name, None, lambda: LlamaServer(llama, gguf, args.threads)))
    for name, chunk, make in servers:
        try:
            with make() as server:
                if chunk == LARGE_CHUNK:
                    _mixed_row(server, label, name, chunk, plan, out)
                    continue
                if name == "numgpt":
                    start = [x for x in server.output().splitlines() if "matmul:" in x]
                    if start:
                        print("  " + start[0].split("matmul:", 1)[1].strip(), flush=True)
                throughput(server.url, SLOTS, 4)  # warm-up: first use of each slot and shape
                rows = []
                for n in plan["clients"]:
                    r = throughput(server.url, n, plan["tokens"])
                    r.update(model=label, weights=weights, server=name)
                    rows.append(r)
                    print(f"  {label} {weights} {name}: {n:2d} clients {r['tok_s']:8.1f} tok/s",
                          flush=True)
                for r in rows:
                    r["speedup"] = r["tok_s"] / rows[0]["tok_s"]
                out["throughput"] += rows
                if name == "numgpt":
                    notes.append(f"{label} {weights}: largest decode batch seen {server.batch_max():.0f}.")
                if plan.get("mixed"):
                    _mixed_row(server, label, name, chunk, plan, out)
                if plan.get("reuse"):
                    r = prefix_reuse(server.url, plan["prefix"], 20, model.config.vocab_size,
                                     plan["repeats"])
                    r.update(model=label, server=name, prefix=plan["prefix"])
                    out["reuse"].append(r)
                    print(f"  prefix reuse {name}: TTFT {r['without']:.3f} s -> {r['with']:.3f} s "
                          f"({r['ratio']:.1f}x)", flush=True)
        except Exception as e:  # one server failing leaves the others' rows
            notes.append(f"{label} {weights} {name}: failed ({type(e).__name__}: {str(e)[:200]}).")
            print(f"  {name} failed: {e}", flush=True)


def _mixed_row(server, label: str, name: str, chunk: int | None, plan: dict, out: dict) -> None:
    ids = list(range(1000, 1000 + plan["newcomer"]))
    throughput(server.url, SLOTS, 4)  # warm-up (a no-op after the throughput rows)
    m = mixed_load(server.url, SLOTS - 1, plan["stream_tokens"], ids)
    m.update(model=label, server=name, streams=SLOTS - 1, prompt=plan["newcomer"],
             chunk="its default batch" if chunk is None else f"--prefill-chunk {chunk}")
    out["mixed"].append(m)
    print(f"  mixed load {name} ({m['chunk']}): ITL p50 {1e3 * m['p50']:.1f} ms p99 "
          f"{1e3 * m['p99']:.1f} ms, newcomer TTFT {m['ttft']:.2f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32, help="tokens per client, 124M")
    p.add_argument("--tokens-medium", type=int, default=16, help="tokens per client, medium")
    p.add_argument("--skip-medium", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per side: numgpt serve --threads and llama-server -t")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--llama-bin", default=_on_path("llama-server"),
                   help="folder holding llama-server (its rows are skipped without it)")
    p.add_argument("--quick", action="store_true",
                   help="a run of well under a minute that proves the script works (a 2-layer "
                        "model, short prompts); its timings mean nothing, nothing is written")
    args = p.parse_args(argv)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)  # this process's step timing uses the servers' threads
    from machine import Machine, write_cpu_section
    from numgpt.core.quant import quantize_model
    from numgpt.serve.engine import matmul_line

    llama = os.path.join(args.llama_bin or "", "llama-server")
    notes = [f"numgpt serve --threads {args.threads} --max-batch {SLOTS}; llama-server -t "
             f"{args.threads} -np {SLOTS} -c {SLOTS * 1024} (its default prompt cache on)"]
    if not args.llama_bin or not os.access(llama, os.X_OK):
        llama = None
        notes.append(f"llama.cpp rows skipped: no executable llama-server in {args.llama_bin}.")
    machine = Machine.measure(args.threads, quick=args.quick)
    print(machine.describe(), flush=True)
    big = dict(clients=CLIENTS, tokens=args.tokens, mixed=True, stream_tokens=48, newcomer=1000,
               reuse=True, prefix=900, repeats=3)
    if args.quick:
        big.update(tokens=4, stream_tokens=8, newcomer=200, prefix=180, repeats=1)
    out = {"throughput": [], "mixed": [], "reuse": [], "step": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = _gpt2_vocab_folder(tmp)
        label = "2x128 (quick)" if args.quick else "gpt2 124M"
        model = _model("quick" if args.quick else "gpt2", tok_dir)
        print(f"{label}: {matmul_line(model)}", flush=True)
        out["step"].append(step_row(label, "f32", model, machine, SLOTS, 5 if args.quick else 20))
        run_model(label, model, "f32", tmp, args, llama, big, out, notes)
        quantize_model(model)
        out["step"].append(step_row(label, "q8_0", model, machine, SLOTS, 5 if args.quick else 20))
        run_model(label, model, "q8_0", tmp, args, llama, dict(clients=CLIENTS, tokens=big["tokens"]),
                  out, notes)
        del model
        if not args.skip_medium:  # --quick: the same path on the 2-layer model
            name = "2x128 (quick, medium's path)" if args.quick else "gpt2 medium"
            medium = _model("quick" if args.quick else "gpt2-medium", tok_dir)
            out["step"].append(step_row(name, "f32", medium, machine, SLOTS, 3 if args.quick else 10))
            run_model(name, medium, "f32", tmp, args, llama,
                      dict(clients=(1, SLOTS), tokens=big["tokens"] if args.quick else args.tokens_medium),
                      out, notes)
            del medium
    notes += _verdicts(out, label)
    notes.append(machine.describe())
    body = "\n\n".join(["### Throughput by clients", throughput_table(out["throughput"]),
                        "### Mixed load", mixed_table(out["mixed"]),
                        "### Prefix reuse", reuse_table(out["reuse"]),
                        "### One decode step against the bound", step_table(out["step"]),
                        "\n".join(f"- {n}" for n in notes)])
    print("\n" + body)
    intro = ("Written by `python benchmarks/bench_server.py` (issue 18): numgpt serve and "
             "llama-server on the same random weights with GPT-2's vocabulary, streaming clients "
             "over loopback HTTP, temperature 1 with a seed per client.")
    if args.quick:  # the writing path too, into a file that is thrown away
        with tempfile.TemporaryDirectory() as tmp:
            written = write_cpu_section(str(Path(tmp) / "bench_server.md"), "Serving", intro,
                                        machine.cpu, body)
        assert f"## {machine.cpu}" in written
        print("\n--quick: nothing written")
        return 0
    write_cpu_section(args.out, "Serving (`benchmarks/bench_server.py`)", intro, machine.cpu, body)
    print(f"\nwritten to {args.out}")
    return 0


def _verdicts(out: dict, label: str) -> list[str]:
    """The issue's targets, each with its figure and PASS/FAIL."""
    notes = []

    def tok_s(weights, server, clients):
        return next((r["tok_s"] for r in out["throughput"] if r["model"] == label and
                     r["weights"] == weights and r["server"] == server and r["clients"] == clients), None)
    for weights, target in TARGETS.items():
        ours, theirs = tok_s(weights, "numgpt", SLOTS), tok_s(weights, LlamaServer.name, SLOTS)
        if ours and theirs:
            notes.append(f"{label} {weights}: numgpt / llama-server at {SLOTS} clients = "
                         f"{ours / theirs:.2f}x (target >= {target}x: {_verdict(ours / theirs >= target)}).")
    one, many = tok_s("f32", "numgpt", 1), tok_s("f32", "numgpt", SLOTS)
    if one and many:
        notes.append(f"{label} f32 numgpt: {SLOTS} clients give {many / one:.2f}x one client "
                     f"(target >= {SCALING_TARGET:g}x: {_verdict(many / one >= SCALING_TARGET)}).")
    for m in out["mixed"]:
        ratio = m["p99"] / m["p50"]
        notes.append(f"mixed load, {m['server']} ({m['chunk']}): stream p99 / p50 inter-token latency "
                     f"{ratio:.2f} (target <= {LATENCY_TARGET:g}: {_verdict(ratio <= LATENCY_TARGET)}); "
                     f"newcomer's first token after {m['ttft']:.2f} s.")
    for r in out["reuse"]:
        notes.append(f"prefix reuse, {r['server']}: {r['ratio']:.1f}x sooner first token "
                     f"(target >= {REUSE_TARGET:g}x: {_verdict(r['ratio'] >= REUSE_TARGET)}).")
    for r in out["step"]:
        notes.append(f"one step, {r['model']} {r['weights']}: {r['ratio']:.2f}x its bound (target "
                     f"<= {STEP_TARGET:g}x: {_verdict(r['ratio'] <= STEP_TARGET)})"
                     + (f"; where the step's time goes (own time by function): {r['profile']}."
                        if r["profile"] else "."))
    return notes


if __name__ == "__main__":
    sys.exit(main())
