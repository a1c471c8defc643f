"""numgpt's GGUF in llama.cpp: the same greedy tokens, and decode speed side by side.

Runs only where llama.cpp's binaries are (``--llama-bin``, default: the folder of ``llama-bench`` on PATH,
needing ``llama-server`` and ``llama-bench``); never in CI. It builds a GPT-2 with random
weights (124M shape; ``--quick``: 2 layers, 128 wide) carrying the real GPT-2 tokenizer
(``--tokenizer``, default the BPE files numgpt ships in numgpt/io/gpt2/, which llama.cpp
needs to load the file),
writes it with ``numgpt convert``'s writer as f32 and q8_0 GGUF files, and for each file:

* greedy tokens: numgpt (``numgpt.load`` of the GGUF, ``sample.generate``) and
  ``llama-server`` (``/completion`` with the prompt given as token ids, temperature 0,
  ``ignore_eos``) must give the same 20 tokens after the same 32-token prompt;
* decode tokens/s, batch 1: numgpt ``sample.stream`` on the GGUF-loaded model (rate
  between the first and last yielded token) and ``llama-bench -p 0 -n N`` (its
  text-generation test), alternated for ``--repeats`` rounds, medians;

and checks a byte-level model's GGUF (vocab 256): llama.cpp loads it, tokenizes text into
its UTF-8 bytes and gives numgpt's greedy tokens; and the chat reply (issue 23): the small
GPT-2-vocabulary model's f32 GGUF carries numgpt's default chat template
(``tokenizer.chat_template``), ``llama-server --jinja`` renders the same messages with it and
answers ``/v1/chat/completions`` greedily (temperature 0, ``max_tokens`` 20) with the text numgpt
gives for the same request body (``numgpt_chat``: ``serve.protocol.parse_chat_completion``,
as ``numgpt serve`` parses it, then ``sample.generate``); its rendered prompt
(``/apply-template``) and prompt token count are compared too.

    python benchmarks/bench_llamacpp.py [--llama-bin DIR] [--threads N] [--tokens 64] [--repeats 3] [--quick]

Writes this CPU's section of ``docs/results/bench_llamacpp.md`` (``machine.write_cpu_section``:
another CPU's section stays; not with ``--quick``). Target (issue 14):
numgpt q8_0 >= 0.8x llama.cpp q8_0. Issue 19's decode targets are checked too: f32 >= 0.95x
llama.cpp f32 and >= 90% of the ceiling (the read bandwidth measured at the start, all
threads, over the weight bytes one token reads), q8_0 >= 1.0x llama.cpp q8_0 and >= 1.8x
numgpt's own f32; both sides' share of the ceiling is in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
RESULTS = os.path.join(REPO, "docs", "results", "bench_llamacpp.md")
# issue 19's decode targets, batch 1: ratios to llama.cpp, share of the bandwidth ceiling, q8_0 over f32
ISSUE19 = {"f32_vs_llama": 0.95, "f32_ceiling": 0.90, "q8_vs_llama": 1.0, "q8_vs_f32": 1.8}
TITLE = "numgpt's GGUF in llama.cpp: greedy tokens and decode speed"
INTRO = ("One section per CPU measured (a result on one vendor says little about the other); "
         "`python benchmarks/bench_llamacpp.py` on a CPU replaces only that CPU's section.")
SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
          "quick": dict(n_layer=2, n_head=4, n_embd=128, block_size=128)}
PROMPT_LEN, GREEDY_TOKENS = 32, 20
TARGET = 0.8


def _on_path(binary: str) -> str | None:
    """The folder holding ``binary`` on PATH (None: the llama.cpp column is skipped)."""
    import shutil

    found = shutil.which(binary)
    return os.path.dirname(found) if found else None


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bin", default=_on_path("llama-bench"),
                   help="folder holding llama-server and llama-bench")
    p.add_argument("--tokenizer", default=os.path.join(REPO, "numgpt", "io", "gpt2"),
                   help="folder with GPT-2 vocab.json + merges.txt (default: the ones numgpt ships)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=64, help="new tokens per timed decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small model, 1 round of 16 tokens; writes nothing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens = 1, 16
    elif args.out is None:
        args.out = RESULTS
    return args


def _binary(args, name: str) -> str | None:
    if not args.llama_bin:
        return None
    path = os.path.join(args.llama_bin, name)
    return path if os.access(path, os.X_OK) else None


# ---------------------------------------------------------------------- llama.cpp side

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@contextmanager
def llama_server(server: str, gguf: str, threads: int, context: int, *flags: str) -> Iterator[str]:
    """A llama-server on a free loopback port, ready (``/health`` 200): yields its base URL
    and stops it on leaving."""
    port = _free_port()
    proc = subprocess.Popen([server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1",
                             "-t", str(threads), "-c", str(context), "-np", "1", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"llama-server {' '.join(flags)} exited: "
                                 f"{proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("llama-server did not become ready in 300 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def llama_greedy(server: str, gguf: str, prompt: list[int], n: int, threads: int) -> list[int]:
    """Greedy token ids from llama-server for a prompt given as ids (no tokenizer involved)."""
    with llama_server(server, gguf, threads, len(prompt) + n + 8) as base:
        out = _post(base + "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0,
                                          "top_k": 1, "ignore_eos": True, "cache_prompt": False,
                                          "return_tokens": True})
    return list(out["tokens"])


def llama_bench(bench: str, gguf: str, n: int, threads: int) -> float:
    """llama-bench's text-generation rate (tokens/s) for n tokens, one repetition."""
    done = subprocess.run([bench, "-m", gguf, "-p", "0", "-n", str(n), "-t", str(threads),
                           "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    return float(next(r for r in rows if r.get("n_gen", 0) > 0)["avg_ts"])


# ------------------------------------------------------------------------- numgpt side

def numgpt_greedy(model, prompt, n: int) -> list[int]:
    from numgpt.infer.sample import SamplingParams, generate

    return generate(model, prompt, n, SamplingParams(temperature=0), stop_at_eot=False)


def numgpt_decode(model, prompt, n: int) -> float:
    from numgpt.infer.sample import SamplingParams, stream

    stamps = [time.perf_counter() for _ in stream(model, prompt, n, SamplingParams(temperature=0),
                                                  stop_at_eot=False)]
    return (n - 1) / (stamps[-1] - stamps[0])


def build(shape: dict, tokenizer_dir: str):
    """A random-weight GPT-2 with the GPT-2 tokenizer (numgpt's init, std 0.02; the first
    layer's scale is raised so greedy tokens are decided by clear margins)."""
    import numpy as np

    from numgpt.core.model import GPT, GPTConfig
    from numgpt.io.tokenizer import GPT2Tokenizer

    model = GPT(GPTConfig(vocab_size=50257, **shape), seed=0)
    model.tokenizer = GPT2Tokenizer.from_folder(tokenizer_dir)
    model.wte.weight.data *= np.float32(5.0)  # logits spread by ~25x: ties are unlikely
    return model


def measure(args, server: str, bench: str) -> list[dict]:
    import numpy as np

    import numgpt
    from numgpt.io.gguf import write_gguf

    model = build(SHAPES["quick" if args.quick else "124M"], args.tokenizer)
    prompt = np.random.default_rng(0).integers(0, 50257, PROMPT_LEN).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("f32", "q8_0"):
            path = str(write_gguf(model, os.path.join(folder, f"model-{dtype}.gguf"), dtype))
            ours = numgpt.load(path)
            mine = numgpt_greedy(ours, prompt, GREEDY_TOKENS)
            theirs = llama_greedy(server, path, prompt, GREEDY_TOKENS, args.threads)
            numgpt_decode(ours, prompt, 4)  # warm-up (numba's first call)
            rates = {"numgpt": [], "llama.cpp": []}
            for _ in range(args.repeats):
                rates["numgpt"].append(numgpt_decode(ours, prompt, args.tokens))
                rates["llama.cpp"].append(llama_bench(bench, path, args.tokens, args.threads))
            rows.append({"dtype": dtype, "same": mine == theirs, "numgpt_tokens": mine,
                         "llama_tokens": theirs, "size": os.path.getsize(path),
                         "bytes": weight_bytes_per_token(ours),
                         **{k: statistics.median(v) for k, v in rates.items()}})
            del ours
    return rows


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix and vector once, one row of wpe
    (q8_0 blocks at their stored size)."""
    from numgpt.core import quant

    wpe = model.wpe.weight.data
    return quant.weight_bytes(model)["total"] - wpe.nbytes + wpe[0].nbytes


def byte_level_check(args, server: str) -> dict:
    """A byte-level model (vocab 256, no BPE) in llama.cpp: its GGUF loads, llama-server's
    /tokenize gives the text's UTF-8 bytes as ids (numgpt's ByteTokenizer), and greedy
    tokens equal numgpt's."""
    from numgpt.core.model import GPT, GPTConfig
    from numgpt.io.gguf import write_gguf
    from numgpt.io.tokenizer import ByteTokenizer

    import numgpt

    model = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128), seed=1)
    model.tokenizer = ByteTokenizer()
    text = "ROMEO: Hello, world!\nÀ bientôt"
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_gguf(model, os.path.join(folder, "bytes.gguf"), "q8_0"))
        prompt = list(text.encode("utf-8"))
        mine = numgpt_greedy(numgpt.load(path), prompt, GREEDY_TOKENS)
        port = _free_port()
        proc = subprocess.Popen([server, "-m", path, "--port", str(port), "--host", "127.0.0.1",
                                 "-t", str(args.threads), "-c", "128", "-np", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    with urllib.request.urlopen(base + "/health", timeout=5):
                        break
                except OSError:
                    time.sleep(0.5)
            ids = _post(base + "/tokenize", {"content": text})["tokens"]
            theirs = _post(base + "/completion", {"prompt": prompt, "n_predict": GREEDY_TOKENS,
                                                  "temperature": 0, "top_k": 1, "ignore_eos": True,
                                                  "cache_prompt": False, "return_tokens": True})["tokens"]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"tokenize_is_bytes": ids == prompt, "same": mine == list(theirs)}


# ------------------------------------------------------------------------ chat reply

CHAT_MESSAGES = [{"role": "system", "content": "You answer in one word."},
                 {"role": "user", "content": "What is 2 + 3?"},
                 {"role": "assistant", "content": "Five."},
                 {"role": "user", "content": "And 2 * 3?"}]


def chat_request(messages: list[dict], n: int) -> dict:
    """The OpenAI chat body both servers get: greedy (temperature 0, and top_k 1, an extension
    numgpt and llama-server both read, so neither samples), at most n new tokens."""
    return {"model": "gpt2", "messages": messages, "max_tokens": n, "temperature": 0,
            "top_k": 1, "stream": False}


def numgpt_chat(model, body: dict) -> dict:
    """numgpt's answer to a chat body: parsed as ``numgpt serve``'s /v1/chat/completions
    parses it (the model's template, else numgpt's default, with the generation prompt;
    its max_tokens, sampling and stops), then the one decoder. Returns the rendered prompt,
    its ids, the reply's ids and text."""
    from numgpt.infer.sample import generate
    from numgpt.io.chat import template_of
    from numgpt.serve.protocol import parse_chat_completion

    context = model.config.block_size
    spec = parse_chat_completion(body, tokenizer=model.tokenizer, template=template_of(model),
                                 vocab_size=model.config.vocab_size, context=context,
                                 max_tokens_limit=context, max_n=1, max_sequences=1)
    ids = generate(model, spec.prompts[0], spec.max_tokens, spec.params, stop=spec.stop or None)
    return {"prompt_text": spec.prompt_texts[0], "prompt_ids": spec.prompts[0], "ids": ids,
            "text": model.tokenizer.decode(ids)}


def _post_or_none(url: str, body: dict) -> dict | None:
    """``_post``, or None where this llama-server build does not serve the route."""
    import urllib.error

    try:
        return _post(url, body)
    except urllib.error.HTTPError:
        return None


def llama_chat(server: str, gguf: str, body: dict, threads: int, context: int) -> dict:
    """llama-server's answer to a chat body, the GGUF's chat template run by its Jinja engine
    (``--jinja``): the rendered prompt (``/apply-template``, None where not served), the
    reply's text and its usage's prompt token count."""
    with llama_server(server, gguf, threads, context, "--jinja") as base:
        rendered = _post_or_none(base + "/apply-template", {"messages": body["messages"]})
        out = _post(base + "/v1/chat/completions", body)
    return {"prompt_text": rendered.get("prompt") if rendered else None,
            "text": out["choices"][0]["message"].get("content") or "",
            "prompt_tokens": out.get("usage", {}).get("prompt_tokens")}


def chat_check(args, server: str) -> dict:
    """Issue 23: the same chat messages to numgpt and to llama-server on numgpt's GGUF export
    (the small GPT-2-vocabulary model, f32, numgpt's default chat template) give the same
    greedy reply."""
    import numgpt
    from numgpt.io.gguf import write_gguf

    model = build(SHAPES["quick"], args.tokenizer)
    body = chat_request(CHAT_MESSAGES, GREEDY_TOKENS)
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_gguf(model, os.path.join(folder, "chat.gguf"), "f32"))
        mine = numgpt_chat(numgpt.load(path), body)
        theirs = llama_chat(server, path, body, args.threads, model.config.block_size)
    return {"same": mine["text"] == theirs["text"], "numgpt_text": mine["text"],
            "llama_text": theirs["text"], "numgpt_ids": mine["ids"],
            "same_prompt": (None if theirs["prompt_text"] is None
                            else theirs["prompt_text"] == mine["prompt_text"]),
            "same_prompt_tokens": (None if theirs["prompt_tokens"] is None
                                   else theirs["prompt_tokens"] == len(mine["prompt_ids"]))}


def chat_line(chat: dict) -> str:
    """The report's sentence for ``chat_check``'s result."""
    def word(v):
        return "not served" if v is None else "yes" if v else "NO"

    return (f"Chat reply (issue 23; the small model's f32 GGUF with numgpt's default chat "
            f"template, llama-server --jinja, POST /v1/chat/completions with {len(CHAT_MESSAGES)} "
            f"messages, temperature 0, max_tokens {GREEDY_TOKENS}): same rendered prompt "
            f"(/apply-template): {word(chat['same_prompt'])}; same prompt token count: "
            f"{word(chat['same_prompt_tokens'])}; same reply text as numgpt's: "
            f"{word(chat['same'])}.")


def report(rows: list[dict], args, byte_level: dict | None = None, machine=None,
           chat: dict | None = None) -> str:
    lines = [f"Written by `benchmarks/bench_llamacpp.py` ({'quick, ' if args.quick else ''}"
             f"{machine.describe() + '; ' if machine else ''}"
             f"{args.threads} threads, {args.tokens} new tokens, median of {args.repeats} "
             f"alternated rounds; llama.cpp from {args.llama_bin}). Random weights, GPT-2 "
             f"tokenizer; greedy: {GREEDY_TOKENS} tokens after a {PROMPT_LEN}-token prompt.", "",
             "| GGUF | file MB | same greedy tokens | numgpt tok/s | llama.cpp tok/s | numgpt / llama.cpp "
             "| ceiling tok/s | numgpt / ceiling | llama.cpp / ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:  # ceiling: the read bandwidth measured at the start over the weight bytes per token
        ceiling = machine.bandwidth_gbs * 1e9 / r["bytes"] if machine else float("nan")
        lines.append(f"| {r['dtype']} | {r['size'] / 1e6:.0f} | {'yes' if r['same'] else 'NO'} | "
                     f"{r['numgpt']:.1f} | {r['llama.cpp']:.1f} | {r['numgpt'] / r['llama.cpp']:.2f}x | "
                     f"{ceiling:.1f} | {r['numgpt'] / ceiling:.0%} | {r['llama.cpp'] / ceiling:.0%} |")
    q8 = next(r for r in rows if r["dtype"] == "q8_0")
    lines += ["", f"Target: numgpt q8_0 >= {TARGET}x llama.cpp q8_0: "
              f"{'met' if q8['numgpt'] / q8['llama.cpp'] >= TARGET else 'MISSED'}"]
    f32 = next((r for r in rows if r["dtype"] == "f32"), None)
    if f32 is not None and machine is not None:
        share = f32["numgpt"] * f32["bytes"] / (machine.bandwidth_gbs * 1e9)
        checks = [(f"f32 >= {ISSUE19['f32_vs_llama']}x llama.cpp f32",
                   f32["numgpt"] / f32["llama.cpp"] >= ISSUE19["f32_vs_llama"]),
                  (f"f32 >= {ISSUE19['f32_ceiling']:.0%} of the ceiling", share >= ISSUE19["f32_ceiling"]),
                  (f"q8_0 >= {ISSUE19['q8_vs_llama']}x llama.cpp q8_0",
                   q8["numgpt"] / q8["llama.cpp"] >= ISSUE19["q8_vs_llama"]),
                  (f"q8_0 >= {ISSUE19['q8_vs_f32']}x numgpt f32", q8["numgpt"] / f32["numgpt"] >= ISSUE19["q8_vs_f32"])]
        lines += ["", "Targets (issue 19): " + "; ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in checks)]
    if byte_level is not None:
        lines += ["", f"Byte-level model (vocab 256, q8_0 GGUF with the 256 byte tokens and one inert "
                  f"merge): llama.cpp loads it; its /tokenize gives the UTF-8 bytes as ids: "
                  f"{'yes' if byte_level['tokenize_is_bytes'] else 'NO'}; same {GREEDY_TOKENS} greedy "
                  f"tokens as numgpt: {'yes' if byte_level['same'] else 'NO'}."]
    if chat is not None:
        lines += ["", chat_line(chat)]
    for r in rows:
        if not r["same"]:
            lines.append(f"\n{r['dtype']}: numgpt {r['numgpt_tokens']} vs llama.cpp {r['llama_tokens']}")
    if chat is not None and not chat["same"]:
        lines.append(f"\nchat: numgpt {chat['numgpt_text']!r} vs llama.cpp {chat['llama_text']!r}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse(argv)
    server, bench = _binary(args, "llama-server"), _binary(args, "llama-bench")
    if server is None or bench is None:
        where = args.llama_bin or "PATH (no --llama-bin given)"
        print(f"skipped: llama-server and llama-bench not found in {where}, so none of "
              f"the greedy-token, decode-speed, byte-level and chat-reply checks ran "
              f"(build llama.cpp there or pass --llama-bin)")
        return 0
    if not os.path.isfile(os.path.join(args.tokenizer, "vocab.json")):
        print(f"skipped: no GPT-2 vocab.json + merges.txt in {args.tokenizer} (pass --tokenizer)")
        return 0
    sys.path.insert(0, REPO)
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    from numgpt.core.threads import set_blas_threads

    set_blas_threads(args.threads)
    sys.path.insert(0, HERE)  # machine.py
    from machine import Machine, write_cpu_section

    machine = Machine.measure(args.threads, quick=args.quick)
    print(machine.describe(), flush=True)
    text = report(measure(args, server, bench), args, byte_level_check(args, server), machine,
                  chat_check(args, server))
    print(text)
    if args.out:  # this CPU's section; the other CPUs' sections stay
        write_cpu_section(args.out, TITLE, INTRO, machine.cpu, text)
        print(f"wrote {os.path.relpath(args.out)} (section {machine.cpu!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
