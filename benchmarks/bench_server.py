"""Serving throughput: aggregate generated tokens/s at 1, 4 and 16 concurrent streaming clients.

Starts the real ``numgpt serve`` in a subprocess on a free loopback port for each model
(random weights, saved to a temporary folder), then runs N client threads at once, each
streaming one completion over HTTP (server-sent events). Aggregate throughput is the
tokens received by all clients divided by the wall time from the first request to the
last ``[DONE]``. Continuous batching is what makes 16 clients faster than 1: the model's
weights are read once per decode step for every active sequence.

Models: a small byte-level GPT (4 layers, 128 wide) and the GPT-2 124M shape with GPT-2's
vocabulary (its BPE files ship with numgpt, in numgpt/io/gpt2/).

llama.cpp beside numgpt (issue 11): for the GPT-2-vocabulary model the same weights are
written as an f32 GGUF (numgpt's writer) and served by ``llama-server -np 16`` (16 parallel
slots, ``--llama-bin DIR``, default: the folder of ``llama-server`` on PATH); the same clients hit its
OpenAI-compatible ``/v1/completions``. Without the binary its rows are skipped with the
reason. Targets: 16 clients >= 8x one client, and above llama.cpp at 16 clients.

    python benchmarks/bench_server.py [--tokens-small 128] [--tokens-124m 32] [--threads 1]
    python benchmarks/bench_server.py --quick   # proves the script works: small model, 4
                                                # tokens per client, no results file written

Prints the table and writes it to ``docs/results/bench_server.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from numgpt.io.checkpoint import save  # noqa: E402
from numgpt.io.files import atomic_write  # noqa: E402
from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.io.tokenizer import PACKAGED_GPT2, ByteTokenizer, GPT2Tokenizer  # noqa: E402

CLIENTS = (1, 4, 16)
SCALING_TARGET = 8.0  # issue 11: 16 clients >= 8x the aggregate tokens/s of one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpt2_vocab() -> Path | None:
    """GPT-2's vocab.json + merges.txt as numgpt ships them; None in a broken install."""
    folder = PACKAGED_GPT2
    return folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None


def _small_model(tmp: Path) -> Path:
    m = GPT(GPTConfig(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128), seed=0)
    m.tokenizer = ByteTokenizer()
    return save(m, tmp / "small")


def _gpt2_model(tmp: Path, vocab_dir: Path, small: bool = False) -> tuple[Path, Path]:
    """The GPT-2-vocabulary model (124M shape, or 2 layers x 128 wide for --quick) saved as a
    numgpt checkpoint and as an f32 GGUF with the same weights (for llama-server)."""
    from numgpt.io.gguf import write_gguf

    tok_dir = tmp / "gpt2-tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, tok_dir / name)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=256) if small else GPTConfig.preset("gpt2")
    m = GPT(config, seed=0)
    m.tokenizer = GPT2Tokenizer.from_folder(tok_dir)
    tag = "gpt2-small-test" if small else "gpt2-124m"
    return save(m, tmp / tag), Path(write_gguf(m, tmp / f"{tag}-f32.gguf", "f32"))


class Server:
    """``numgpt serve`` in a subprocess, terminated on exit."""

    def __init__(self, model: Path, max_batch: int, threads: int | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "numgpt", "serve", "--model", str(model), "--port",
               str(self.port), "--max-batch", str(max_batch), "--log-level", "warning"]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("server exited:\n" + self.log.read().decode(errors="replace"))
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

    def batch_max(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("numgpt_decode_batch_size_max "))
        return float(line.split()[1])


def _stream_one(url: str, prompt: str, max_tokens: int, seed: int, barrier: threading.Barrier,
                out: list, i: int) -> None:
    """One streaming client: count token chunks until [DONE]."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
            "seed": seed}
    count = 0
    with httpx.Client(timeout=600) as h:
        barrier.wait()
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice["finish_reason"] is None:
                    count += 1
    out[i] = (count, time.perf_counter())


def measure(url: str, clients: int, max_tokens: int) -> dict:
    """Aggregate tokens/s of ``clients`` simultaneous streaming requests."""
    barrier = threading.Barrier(clients + 1)
    out: list = [None] * clients
    threads = [threading.Thread(target=_stream_one, args=(url, f"Client {i} says", max_tokens,
                                                          i, barrier, out, i))
               for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError("a client failed; see the traceback above")
    tokens = sum(c for c, _ in out)
    elapsed = max(t for _, t in out) - t0
    return {"clients": clients, "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


class LlamaServer(Server):
    """``llama-server -np 16`` on a GGUF in a subprocess (same health check and exit)."""

    def __init__(self, binary: str, gguf: Path, slots: int, threads: int | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [binary, "-m", str(gguf), "--port", str(self.port), "-np", str(slots),
               "-c", str(slots * 256), "--log-disable"]
        cmd += ["-t", str(threads)] if threads else []
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def batch_max(self) -> float:
        return float("nan")  # llama-server has no such metric


def bench_model(name: str, path: Path, max_tokens: int, threads: int | None,
                server_cls=None) -> list[dict]:
    rows = []
    make = (lambda: Server(path, max_batch=max(CLIENTS), threads=threads)) if server_cls is None \
        else (lambda: server_cls(path))
    with make() as server:
        # warm-up: the first use of each cache slot and array shape pays one-off costs
        # (page faults on fresh memory, BLAS buffers)
        measure(server.url, max(CLIENTS), 4)
        for n in CLIENTS:
            r = measure(server.url, n, max_tokens)
            r.update(model=name, max_tokens=max_tokens, batch_max=server.batch_max())
            rows.append(r)
            print(f"  {name}: {n:2d} clients  {r['tokens']:5d} tokens in {r['seconds']:6.2f} s "
                  f"= {r['tok_s']:8.1f} tok/s", flush=True)
    base = rows[0]["tok_s"]
    for r in rows:
        r["speedup"] = r["tok_s"] / base
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | clients | tokens per client | tokens | seconds | aggregate tok/s | x 1 client |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['clients']} | {r['max_tokens']} | {r['tokens']} | "
                     f"{r['seconds']:.2f} | {r['tok_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def write_results(rows: list[dict], path: Path, notes: list[str]) -> None:
    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    text = ("# Serving throughput (`benchmarks/bench_server.py`)\n\n"
            "Aggregate generated tokens/s over concurrent streaming clients (SSE over loopback "
            "HTTP, random-weight models, float32, temperature 1 with a seed per client). "
            f"Written by the benchmark script; machine: {cpu}.\n\n"
            + format_table(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def _on_path(binary: str) -> str | None:
    """The folder holding ``binary`` on PATH (None: the llama.cpp rows are skipped)."""
    found = shutil.which(binary)
    return os.path.dirname(found) if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-small", type=int, default=128, help="tokens per client, small model")
    p.add_argument("--tokens-124m", type=int, default=32, help="tokens per client, 124M shape")
    p.add_argument("--skip-124m", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="the server's --threads (BLAS threads); 0 leaves the BLAS default")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "bench_server.md"))
    p.add_argument("--llama-bin", default=_on_path("llama-server"),
                   help="folder holding llama-server (its rows are skipped without it)")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds' run that proves the script works; its timings mean "
                        "nothing, so no results file is written")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens_small, args.skip_124m = 4, True
    rows = []
    notes = [f"server started with --threads {args.threads} (BLAS threads)" if args.threads
             else "server started with the BLAS library's default thread count"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("small byte-level model (4 layers, n_embd 128, block 256):", flush=True)
        rows += bench_model("small (0.8M, bytes)", _small_model(tmp), args.tokens_small,
                          args.threads)
        vocab = _gpt2_vocab()
        llama = os.path.join(args.llama_bin or "", "llama-server")
        if not args.llama_bin or not os.access(llama, os.X_OK):
            llama = None
            notes.append(f"llama.cpp rows skipped: no executable llama-server in {args.llama_bin}.")
        if vocab is None:
            notes.append(f"GPT-2-vocabulary models skipped: GPT-2 vocab not found in {PACKAGED_GPT2}.")
        else:
            small = args.skip_124m  # --quick: a small GPT-2-vocabulary model proves the llama.cpp path
            label = "gpt2-vocab 2x128 (quick)" if small else "gpt2 124M shape"
            tokens = args.tokens_small if small else args.tokens_124m
            if small:
                notes.append("124M shape skipped (--skip-124m); a 2-layer GPT-2-vocabulary model stands in.")
            print(f"{label} (random weights, GPT-2 vocabulary):", flush=True)
            ckpt, gguf = _gpt2_model(tmp, vocab, small=small)
            rows += bench_model(f"{label}, numgpt", ckpt, tokens, args.threads)
            if llama:
                rows += bench_model(f"{label}, llama-server -np {max(CLIENTS)} f32", gguf, tokens,
                                    args.threads, lambda g: LlamaServer(llama, g, max(CLIENTS),
                                                                        args.threads))
                ours = next(r for r in rows if r["model"] == f"{label}, numgpt" and r["clients"] == max(CLIENTS))
                theirs = rows[-1]
                notes.append(f"{label}: numgpt / llama.cpp at {max(CLIENTS)} clients = "
                             f"{ours['tok_s'] / theirs['tok_s']:.2f}x (target > 1x: "
                             f"{'PASS' if ours['tok_s'] > theirs['tok_s'] else 'FAIL'}).")
    ours = [r for r in rows if r["clients"] == max(CLIENTS) and "llama-server" not in r["model"]]
    for r in ours:
        ok = r["speedup"] >= SCALING_TARGET
        notes.append(f"{r['model']}: {max(CLIENTS)} clients give {r['speedup']:.2f}x the "
                     f"aggregate throughput of 1 (target >= {SCALING_TARGET:g}x: "
                     f"{'PASS' if ok else 'FAIL'}); largest decode batch seen {r['batch_max']:.0f}.")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import Machine

    notes.append(Machine.measure(args.threads or (os.cpu_count() or 1), quick=args.quick).describe())
    table = format_table(rows)
    print("\n" + table + "\n")
    for n in notes:
        print(n)
    if args.quick:
        print("\n--quick: nothing written")
        return 0
    write_results(rows, Path(args.out), notes)
    print(f"\nwritten to {args.out}")
    return 0 if all(r["speedup"] >= SCALING_TARGET for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
