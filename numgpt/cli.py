"""``numgpt <command>``: parses flags, calls the library, prints results. Nothing else.

Each command is a pair: ``_add_<name>(subparsers)`` declares its flags and
``_run_<name>(args) -> int`` calls the library and returns the exit status. A
``NumGPTError`` is printed as one line (``numgpt: error: ...``) with exit status 2,
never as a traceback; so are running out of memory and a disk-full or read-only write that
reached here unconverted. ``--json`` output is always valid JSON (``_print_json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .core.threads import set_blas_threads
from .errors import InputError, NumGPTError
from .io.files import atomic_write, write_error

__all__ = ["main", "build_parser"]


def _print_json(obj, **dumps) -> None:
    """Print ``obj`` as strict JSON: a NaN or infinite float (which ``json.dumps`` would print
    as the non-JSON ``NaN``/``Infinity``) becomes null, and a top-level "notes" list says where."""
    import json
    import math

    notes: list[str] = []

    def clean(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(f"{where} was {value} (not representable in JSON): written as null")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    obj = clean(obj, "")
    if notes and isinstance(obj, dict):
        obj["notes"] = list(obj.get("notes") or []) + notes
    print(json.dumps(obj, allow_nan=False, **dumps))


def _add_finite_flag(p) -> None:
    p.add_argument("--skip-finite-check", action="store_true",
                   help="load weights without the scan that refuses NaN or infinite values "
                        "(saves one pass over a very large model)")


# ------------------------------------------------------------------------ compile

# Commands that run the fast path's compiled kernels unless told to use the reference path.
_KERNEL_COMMANDS = {"train", "generate", "chat", "eval", "serve", "sanity", "trace", "gradcheck"}


def _note_cold_kernel_cache(args) -> None:
    """One line on stderr before a command compiles the kernels from a cold cache, so the
    first run does not stall without a word (a look at the cache folder; nothing loads)."""
    from .core import threads

    if args.command not in _KERNEL_COMMANDS or getattr(args, "reference_hf", None) \
            or "reference" in (getattr(args, "kernels", None), getattr(args, "path", None)):
        return  # transformers records the trace, or the NumPy reference ops run
    if threads.kernel_cache_is_cold():
        print(f"numgpt: compiling kernels (first run only; `numgpt compile` does it ahead) into "
              f"{threads.kernel_cache_dir()} ...", file=sys.stderr, flush=True)


# Commands whose matrix products run on the GEMM library (core/gemm.py): each takes --gemm
# and names the library on stderr when it starts; info takes --gemm to show that choice.
_GEMM_COMMANDS = _KERNEL_COMMANDS | {"inspect"}


def _add_gemm_flag(p) -> None:
    from .core.gemm import CHOICES

    p.add_argument("--gemm", choices=CHOICES, default=None,
                   help="the library that multiplies the weight matrices: NumPy's openblas, or "
                        "mkl (pip install 'numgpt[mkl]'); auto (the default, or NUMGPT_GEMM) "
                        "takes what `numgpt compile` measured on this CPU, else the CPU vendor's")


def _note_gemm(args) -> None:
    """Choose the GEMM library before NumPy loads and say which and why on stderr (never a
    silent switch); ConfigError when --gemm/NUMGPT_GEMM asks for one that is not here."""
    from .core import gemm

    if getattr(args, "gemm", None):
        os.environ[gemm.ENV] = args.gemm  # this process's gemm.select() and its MPI ranks
        gemm.deselect()  # a library chosen earlier in this process yields to the flag
    if args.command not in _GEMM_COMMANDS:
        return  # info prints gemm.describe() with the rest
    lib, why = gemm.resolve(getattr(args, "gemm", None), "--gemm")
    if lib == "mkl" and not why.startswith("auto"):
        gemm.load("mkl")  # now, before torch can (`trace --reference-hf` imports it)
    elif lib == "mkl" and "mkl" not in gemm.available():
        lib, why = "openblas", f"{why}; but mkl did not load -> openblas"
    rows = f"; decode rows: {gemm.decode_rows_text()}" if args.command == "serve" else ""
    if _launched_rank() == 0:  # once under mpiexec, not once per rank
        print(f"numgpt: GEMM library {lib}: {why}{rows}", file=sys.stderr, flush=True)


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile the fast path's kernels into numba's cache now "
                                       "(the first run of any command does it otherwise), and "
                                       "time the GEMM libraries here for --gemm auto")
    p.set_defaults(run=_run_compile)


def _run_compile(args) -> int:
    from .core import threads

    _measure_gemm()  # first: the kernels' summary stays the last line
    cold = threads.kernel_cache_is_cold()
    print(f"{'compiling' if cold else 'loading'} every kernel, both builds, float32 and float64; "
          f"cache {threads.kernel_cache_dir()}", flush=True)
    from .core import kernels

    before = threads.kernel_index_stamps()
    seconds = kernels.compile_all()
    after = threads.kernel_index_stamps()
    # counted from the index files numba (re)wrote, not guessed from before: after an edit of
    # kernels.py a warm-looking cache still compiles what changed
    compiled = sum(1 for name, t in after.items() if before.get(name) != t)
    done = {name: n for name, n in kernels.compiled_kernels().items() if n}
    for name, n in done.items():
        print(f"  {name:36s} {n} signature{'s' if n > 1 else ''}")
    print(f"{len(done)} functions ready in {seconds:.1f} s; {compiled} kernels compiled, the "
          f"rest loaded from the cache; cache {threads.kernel_cache_dir()}")
    return 0


def _measure_gemm() -> None:
    """Time the GEMM libraries at numgpt's shapes and record the choice for --gemm auto; not
    while NUMGPT_GEMM names a library (the choice is fixed, and the test suite sets it so that
    a run on a busy machine never records its timings as this machine's choice)."""
    import json
    import time

    from .core import gemm

    fixed = os.environ.get(gemm.ENV)
    if fixed and fixed != "auto":
        gemm.resolve(None)  # an unknown name is refused as everywhere
        print(f"GEMM library fixed by {gemm.ENV}={fixed}: not measured (unset it to let "
              f"`numgpt compile` time the libraries for --gemm auto)")
        return
    t0 = time.perf_counter()
    results = gemm.measure()
    record, choice, summary = gemm.record_measurement(results)
    atomic_write(gemm.record_path(), json.dumps(record, indent=1) + "\n")
    for group, shapes in gemm.SHAPES.items():
        rates = "  ".join(f"{lib} {sum(r[group]) / len(r[group]):.0f}" for lib, r in results.items())
        print(f"  GEMM {group:16s} mean GFLOP/s over {len(shapes)} shapes: {rates}")
    print(f"GEMM library for --gemm auto on this {gemm.cpu_model()}: {choice} ({summary}; "
          f"{time.perf_counter() - t0:.1f} s); recorded in {gemm.record_path()}")


# ------------------------------------------------------------------------ gradcheck

def _add_gradcheck(sub) -> None:
    p = sub.add_parser("gradcheck", help="run the gradient-check gate over every op and composite")
    p.add_argument("--path", choices=["fast", "reference"], default="fast",
                   help="op path to check: the compiled kernels (fast, the default everywhere) or "
                        "the NumPy reference ops")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the table to FILE as Markdown (default: print it only; "
                        "the suite's tables are docs/results/gradcheck.md and gradcheck_fast.md)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_gradcheck)


def _run_gradcheck(args) -> int:
    from .verify import gradcheck

    print(f"gradient gate on the {args.path} path")
    results = gradcheck.run_gate(seed=args.seed, path=args.path)
    print(gradcheck.format_table(results))
    if args.out is not None:
        gradcheck.write_table(results, args.out, op_path=args.path)
    bad = [r for r in results if not r.ok]
    n = sum(1 for r in results if not r.expect_fail)
    print(f"\n{n - sum(1 for r in bad if not r.expect_fail)}/{n} checks pass; "
          f"negative control {'FAILED as it must' if not any(r.expect_fail for r in bad) else 'PASSED: gate broken'}"
          + (f"; table written to {args.out}" if args.out is not None else ""))
    return 1 if bad else 0


# ------------------------------------------------------------- convert, info, tokenize

_CONVERT_HELP = """\
Read any checkpoint numgpt loads (a Hugging Face GPT-2 folder, a nanoGPT ckpt.pt, a numgpt
PREFIX, a GPT-2 .gguf) and write it as a numgpt checkpoint, a Hugging Face folder or a GGUF
file for llama.cpp.
Output format rule (when --format is not given): DST ending in .gguf -> GGUF (llama.cpp's
GPT-2 layout; --dtype f32, f16 or q8_0, default f32); DST that is an existing folder or
ends with '/' -> Hugging Face folder (config.json + model.safetensors, and the tokenizer's
files when it has any);
anything else -> numgpt checkpoint DST.json + DST.safetensors (a trailing .json or
.safetensors on DST is dropped)."""


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to numgpt, Hugging Face or GGUF format",
                       description=_CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="HF folder, nanoGPT ckpt.pt, numgpt PREFIX or run folder, or .gguf")
    p.add_argument("dst", metavar="DST", help="output PREFIX (numgpt), FOLDER/ (hf) or FILE.gguf")
    p.add_argument("--format", choices=["numgpt", "hf", "gguf"], default=None,
                   help="output format (default: from DST, see above)")
    p.add_argument("--dtype", choices=["float32", "float64", "f32", "f16", "q8_0"], default=None,
                   help="numgpt/hf: cast the weights to float32/float64 (default: keep the stored "
                        "dtype); gguf: f32, f16 or q8_0 tensors (default f32)")
    _add_finite_flag(p)
    p.set_defaults(run=_run_convert)


def _run_gguf_convert(args) -> int:
    from .io import checkpoint
    from .io.gguf import write_gguf

    dtype = {"float32": "f32", None: "f32"}.get(args.dtype, args.dtype)
    if dtype == "float64":
        raise InputError("GGUF holds f32, f16 or q8_0 tensors; --dtype float64 is not one of them")
    model = checkpoint.load(args.src, check_finite=not args.skip_finite_check)
    out = write_gguf(model, args.dst, dtype)
    print(f"wrote GGUF {out} ({dtype}, {out.stat().st_size:,} bytes, llama.cpp GPT-2 layout) "
          f"from {model.source['format']} {args.src}")
    return 0


def _run_convert(args) -> int:
    from .io import checkpoint
    from .io.tokenizer import ByteTokenizer

    fmt = args.format or ("gguf" if args.dst.endswith(".gguf") else
                          "hf" if args.dst.endswith(("/", "\\")) or Path(args.dst).is_dir() else "numgpt")
    if fmt == "gguf":
        return _run_gguf_convert(args)
    if args.dtype in ("f32", "f16", "q8_0"):
        raise InputError(f"--dtype {args.dtype} is for GGUF output; for {fmt} use float32 or "
                         f"float64 (or `numgpt quantize` for q8_0 weights)")
    if fmt == "numgpt" and Path(args.dst).is_dir():
        raise InputError(f"DST {args.dst!r} is a folder; a numgpt checkpoint is a file prefix such "
                         f"as {str(Path(args.dst) / 'model')!r} (or pass --format hf)")
    model = checkpoint.load(args.src, dtype=args.dtype, check_finite=not args.skip_finite_check)
    if fmt == "hf":
        out = checkpoint.export_hf(model, args.dst)
        # what the folder holds, not a fixed list: which tokenizer files exist depends on the model
        held = sorted((p.name for p in out.iterdir() if p.is_file()),
                      key=lambda n: (n not in ("config.json", "model.safetensors"), n))
        wrote = f"Hugging Face folder {out}/ ({' + '.join(held)})"
        if isinstance(model.tokenizer, ByteTokenizer):
            wrote += ("; the byte tokenizer has no vocabulary files: config.json names it "
                      "(numgpt_tokenizer: bytes) for numgpt")
    else:
        out = checkpoint.save(model, args.dst)
        wrote = f"numgpt checkpoint {out}.json + {out}.safetensors"
    d = checkpoint.describe(model)
    print(f"wrote {wrote}: {d['parameters']:,} parameters, {d['dtype']}, from "
          f"{model.source['format']} {args.src}")
    return 0


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="store a model's matrices as 8-bit blocks (q8_0) for "
                       "smaller, faster inference")
    p.add_argument("model", metavar="MODEL", help="HF folder, nanoGPT ckpt.pt, numgpt PREFIX or run folder, or .gguf")
    p.add_argument("out", metavar="OUT", help="output numgpt checkpoint PREFIX")
    p.add_argument("--scheme", default="q8_0",
                   help="q8_0: blocks of 32 int8 weights sharing one float16 scale (GGML's layout)")
    p.add_argument("--activations", choices=["float32", "q8_0"], default=None,
                   help="what the weights are multiplied with, recorded in the checkpoint: float32 "
                        "(default: exact to the stored weights) or q8_0 (activations quantized per "
                        "32-block too, integer dot products, as llama.cpp; see the README). Given "
                        "a q8_0 model, only this setting changes")
    p.set_defaults(run=_run_quantize)


def _run_quantize(args) -> int:
    from .core import quant
    from .io import checkpoint

    if args.scheme not in quant.SCHEMES:
        raise InputError(f"--scheme {args.scheme!r} is not supported; choose one of {list(quant.SCHEMES)}")
    model = checkpoint.load(args.model)
    if quant.is_quantized(model) and args.activations is not None:  # re-record the setting only
        quant.set_activations(model, args.activations)
    else:
        model = quant.quantize_model(model, args.scheme, args.activations or "float32")
    out = checkpoint.save(model, args.out)
    sizes = quant.weight_bytes(model)
    print(f"wrote {args.scheme} checkpoint {out}.json + {out}.safetensors: "
          f"{sizes['total']:,} bytes of weights in memory ({sizes['quantized']:,} in {args.scheme} "
          f"matrices, {sizes['float']:,} float32 norms, biases and wpe)")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a checkpoint's format, config, size, dtype and tokenizer")
    p.add_argument("model", metavar="MODEL", help="HF folder, nanoGPT ckpt.pt, numgpt PREFIX or run folder, or .gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_finite_flag(p)
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    import json

    from .io import checkpoint

    from .core import gemm

    d = checkpoint.describe(checkpoint.load(args.model, check_finite=not args.skip_finite_check))
    d["gemm"] = gemm.describe()  # the library this machine multiplies with, and why
    if args.json:
        _print_json(d, indent=2)
        return 0
    tok = d["tokenizer"]
    print(f"format      {d['format']}  ({d['path']})")
    print(f"weights     {d['weights']}")
    print("config      " + " ".join(f"{k}={v}" for k, v in d["config"].items()))
    print(f"parameters  {d['parameters']:,}")
    print(f"dtype       {d['dtype']}")
    print(f"kernels     {d['config'].get('kernels', 'fast')} (the op path: 'fast' compiled kernels or "
          f"'reference' NumPy ops)")
    print(f"gemm        {d['gemm']}")
    if d.get("quantization"):
        q = d["quantization"]
        print(f"quantized   {q['scheme']}: {q['bytes']:,} bytes of weights in memory "
              f"({q['quantized_bytes']:,} in {q['scheme']} blocks, {q['float_bytes']:,} float32); "
              f"activations {q.get('activations') or 'float32'}")
        from .core import quant

        print(f"q8_0 kernels {quant.kernel_plan()}")
    tok_text = "none" if tok is None else f"{tok['type']} vocab_size={tok['vocab_size']}"
    print(f"tokenizer   {tok_text}")
    for note in d["notes"]:
        print(f"note        {note}")
    return 0


def _add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="text -> token ids (JSON), or ids -> text with --decode")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="checkpoint whose tokenizer to use")
    src.add_argument("--tokenizer", metavar="SPEC",
                     help="'bytes', 'gpt2' (GPT-2's BPE, shipped with numgpt), or a folder with "
                          "vocab.json + merges.txt")
    p.add_argument("--decode", action="store_true",
                   help="TEXT is token ids, as a JSON list '[15496, 13]' or '15496 13'")
    p.add_argument("--plain", action="store_true",
                   help="spell '<|endoftext|>' out as ordinary text (default: its special id "
                        "50256, the rule numgpt applies everywhere)")
    p.add_argument("--allow-special", action="store_true",
                   help="the default (kept for scripts written before it was)")
    p.add_argument("text", nargs="*", metavar="TEXT",
                   help="text (several words are joined with one space); stdin when absent")
    p.set_defaults(run=_run_tokenize)


def _parse_ids(text: str) -> list[int]:
    """'[1, 2]' (JSON) or '1 2' / '1,2' -> [1, 2]; InputError naming the bad entry."""
    text = text.strip()
    if text.startswith("["):
        import json

        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"token ids {text[:60]!r} are not a valid JSON list ({e})") from None
    else:
        ids = [t for t in text.replace(",", " ").split()]
    from .core.checks import is_int  # loads NumPy: only once the thread count is set

    out = []
    for t in ids:
        if isinstance(t, str) and t.lstrip("-").isdigit():
            t = int(t)
        if not is_int(t):
            raise InputError(f"token id {t!r} is not an integer; give ids like '[15496, 13]' "
                             f"or '15496 13'")
        out.append(int(t))
    return out


def _run_tokenize(args) -> int:
    import json

    from .io import checkpoint
    from .io import tokenizer

    if args.model is not None:
        tok, notes = checkpoint.find_tokenizer(args.model)
        if tok is None:
            raise InputError(f"{args.model} has no tokenizer ({'; '.join(notes)}); "
                             f"pass --tokenizer bytes, --tokenizer gpt2 or --tokenizer FOLDER")
    else:
        tok = tokenizer.load_tokenizer(args.tokenizer)
    text = " ".join(args.text) if args.text else sys.stdin.read()
    if args.decode:
        print(tok.decode(_parse_ids(text)))
    else:
        print(json.dumps(tok.encode(text, allow_special=not args.plain)))
    return 0


# --------------------------------------------------------------------------- serve

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI-compatible completions and chat "
                                     "completions APIs")
    p.add_argument("--model", required=True,
                   help="numgpt checkpoint or run folder (its best checkpoint), HF folder or nanoGPT ckpt.pt")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $NUMGPT_API_KEY, else none)")
    p.add_argument("--max-batch", type=_positive_int, default=8,
                   help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="sequences allowed to wait for a slot before 503")
    p.add_argument("--prefill-chunk", type=_positive_int, default=64, metavar="N",
                   help="prompt tokens one step computes beside the running streams' next "
                        "tokens: a long prompt is read N at a time while they keep flowing "
                        "(default 64; up to 512 while none is running)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0, metavar="MB",
                   help="MiB of recent prompt prefixes' keys/values kept for reuse by later "
                        "prompts that start the same way (default 256; 0 keeps only each "
                        "free slot's own)")
    p.add_argument("--max-tokens-limit", type=_positive_int, default=None,
                   help="largest max_tokens a request may ask for (default: the context length)")
    p.add_argument("--model-name", default=None,
                   help="the model's name in answers and /v1/models; requests may name any model "
                        "(default: the path's last part, or its folder for best/latest/ckpt.pt)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20)
    p.add_argument("--max-prompt-chars", type=_positive_int, default=None,
                   help="characters per prompt, checked before tokenizing (default 32 x context)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=None,
                   help="tokens per prompt; longer needs \"truncate\" anyway (default 8 x context)")
    p.add_argument("--header-timeout", type=_positive_float, default=10.0, metavar="S",
                   help="close a connection whose request headers take longer (default 10)")
    p.add_argument("--body-timeout", type=_positive_float, default=30.0, metavar="S",
                   help="answer 408 when a request body takes longer (default 30)")
    p.add_argument("--max-connections", type=_positive_int, default=128,
                   help="connections served at once; past it requests get 503 (default 128)")
    p.add_argument("--grace-period", type=_positive_float, default=10.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds in-flight requests may run before they "
                        "are cancelled; the exit status is 0 (default 10)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="BLAS threads for the model (default: the BLAS library's choice); "
                        "1 is fastest on a machine whose cores are busy with other work")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host names answered besides IP addresses, localhost and "
                        "--host ('*': any); others get 400 (DNS rebinding)")
    _add_chat_template_flag(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=_run_serve)


def _add_chat_template_flag(p) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja2 chat template (a text file, or a tokenizer_config.json) for chat "
                        "messages (default: the model's own, else numgpt's 'role: content' "
                        "with end-of-text separators)")


def _chat_template(args) -> str | None:
    from .io.chat import read_template_file

    return None if args.chat_template is None else read_template_file(args.chat_template)


def _run_serve(args) -> int:
    import logging
    import os

    if args.threads is not None:
        set_blas_threads(args.threads)
    from .serve import app
    from .io.checkpoint import detect_format

    detect_format(args.model)  # a missing or unrecognised path fails now, not after startup
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    # an explicitly empty key (--api-key "$UNSET") is refused by ServerConfig, not ignored
    api_key = args.api_key if args.api_key is not None else os.environ.get("NUMGPT_API_KEY")
    config = app.ServerConfig(
        model_path=args.model, model_name=args.model_name, api_key=api_key,
        max_batch=args.max_batch, max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        max_connections=args.max_connections, grace_period_s=args.grace_period,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        chat_template=_chat_template(args), prefill_chunk=args.prefill_chunk,
        prefix_cache_mb=args.prefix_cache_mb)
    return app.serve(config, host=args.host, port=args.port, log_level=args.log_level)


# ------------------------------------------------------------------ generate, eval

# The one escape rule for stop strings typed by hand (llama.cpp's CLI processes the same
# escapes in its prompts and reverse prompts): --stop here and the playground's stop box
# (serve/static/playground.js, unescapeStop) turn these two-character sequences into one
# character; any other backslash stays as typed. The HTTP API takes JSON strings as they are.
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def unescape(text: str) -> str:
    """``text`` with ``\\n``, ``\\t``, ``\\r``, ``\\\\``, ``\\"`` and ``\\'`` made into the characters
    they name, read left to right (``\\\\n`` is a backslash then ``n``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPES:
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _load_for_use(path: str, dtype: str | None, tokenizer_spec: str | None,
                  check_finite: bool = True):
    """The model at ``path`` with a usable tokenizer (``--tokenizer`` overrides the stored one)."""
    from .io import checkpoint
    from .io import tokenizer

    model = checkpoint.load(path, dtype=dtype, check_finite=check_finite)
    if tokenizer_spec is not None:
        model.tokenizer = tokenizer.load_tokenizer(tokenizer_spec)
    if model.tokenizer is None:
        raise InputError(f"{path} has no tokenizer; pass --tokenizer bytes, --tokenizer gpt2 or "
                         f"--tokenizer FOLDER (a folder with vocab.json + merges.txt)")
    return model


def _add_model_flags(p) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="numgpt checkpoint PREFIX or run folder (its best checkpoint), Hugging "
                        "Face folder, or nanoGPT ckpt.pt")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="override the model's tokenizer: 'bytes', 'gpt2' (shipped with numgpt) or a "
                        "folder with vocab.json + merges.txt")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="compute dtype (default: the stored one)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="BLAS threads (default: the BLAS library's choice); 1 is fastest on a "
                        "machine whose cores are busy with other work")
    _add_finite_flag(p)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed as it is produced")
    _add_model_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('<|endoftext|>' is the special token)")
    p.add_argument("-n", "--max-new-tokens", dest="max_new_tokens", type=int, default=100,
                   help="tokens to generate per sample (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="same seed, same tokens")
    p.add_argument("--ascii-only", action="store_true",
                   help="only draw tokens made of printable ASCII and newline")
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR", type=unescape,
                   help="end a sample at this text, not printed; the escapes \\n \\t \\r \\\\ \\\" \\' "
                        "are read as the characters they name (--stop '\\n' stops at a newline; "
                        "'\\\\n' is a backslash and n)")
    p.add_argument("--num-samples", type=int, default=1, metavar="M", help="independent samples (default 1)")
    p.add_argument("--window", type=int, default=None,
                   help="tokens kept when the context passes block_size (default block_size // 2)")
    p.add_argument("--no-eot", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sample: prompt_ids, generated_ids, text")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    import codecs
    import json
    import warnings

    if args.threads is not None:
        set_blas_threads(args.threads)
    from .infer import sample

    if args.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {args.num_samples}")
    params = sample.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   ascii_only=args.ascii_only, seed=args.seed)
    model = _load_for_use(args.model, args.dtype, args.tokenizer, not args.skip_finite_check)
    tok = model.tokenizer
    prompt = sample.check_prompt(model, tok.encode(args.prompt))
    opts = dict(stop=args.stop, stop_at_eot=not args.no_eot, tokenizer=tok, window=args.window)
    with warnings.catch_warnings():
        warnings.simplefilter("always", sample.ContextSlideWarning)
        warnings.showwarning = lambda message, *_a, **_k: print(f"\nnumgpt: note: {message}", file=sys.stderr)
        if args.json:
            outs = sample.generate_batch(model, [prompt] * args.num_samples, args.max_new_tokens,
                                         params, **opts)
            for ids in outs:
                _print_json({"prompt_ids": prompt, "generated_ids": ids, "text": tok.decode(ids)})
            return 0
        for j in range(args.num_samples):
            if args.num_samples > 1:
                print(f"{'' if j == 0 else chr(10)}---------- sample {j + 1} of {args.num_samples} ----------")
            sys.stdout.write(tok.decode(prompt))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # UTF-8 split over tokens
            for token in sample.stream(model, prompt, args.max_new_tokens, params, **opts,
                                       rng=sample.sample_rng(args.seed, j)):
                sys.stdout.write(decoder.decode(tok.token_bytes(token)))
                sys.stdout.flush()
            print(decoder.decode(b"", final=True))
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk with a model in the terminal: each line you type is a "
                                    "message, the reply streams back (/reset, /exit)")
    _add_model_flags(p)
    _add_chat_template_flag(p)
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message that starts the conversation (kept through /reset)")
    p.add_argument("-n", "--max-new-tokens", dest="max_new_tokens", type=_positive_int,
                   default=256, help="most tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="same seed, same conversation")
    p.set_defaults(run=_run_chat)


def _run_chat(args) -> int:
    if args.threads is not None:
        set_blas_threads(args.threads)
    from .infer import chat, sample

    model = _load_for_use(args.model, args.dtype, args.tokenizer, not args.skip_finite_check)
    params = sample.SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("numgpt chat: type a message and press Enter; /reset forgets the conversation, "
              "/exit (or Ctrl-D) leaves", file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return chat.run_chat(model, sys.stdin, write, max_new_tokens=args.max_new_tokens,
                         params=params, template=_chat_template(args), system=args.system,
                         prompt="> " if interactive else "")


def _add_chat_data(sub) -> None:
    p = sub.add_parser("chat-data", help="write a small synthetic conversation set (questions "
                                         "'N+1', some held out) for a first chat fine-tune")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for train.jsonl, heldout.jsonl, questions.txt, template.jinja")
    p.add_argument("--numbers", type=_positive_int, default=100,
                   help="questions 'N+1' for N below this (default 100)")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="share of the N never shown in training (default 0.2)")
    p.add_argument("--repeat", type=_positive_int, default=8,
                   help="times each training question appears (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which N are held out, and the order")
    p.set_defaults(run=_run_chat_data)


def _run_chat_data(args) -> int:
    from .io import chat

    files = chat.write_arithmetic_set(args.out, numbers=args.numbers, held_out=args.held_out,
                                      repeat=args.repeat, seed=args.seed)
    counts = {k: sum(1 for _ in open(p, encoding="utf-8")) for k, p in files.items()
              if k in ("train", "heldout")}
    print(f"wrote {args.out}: {counts['train']} training conversations, {counts['heldout']} "
          f"held-out questions (questions.txt), the chat template (template.jinja)")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a text file and/or LAMBADA last-word accuracy")
    _add_model_flags(p)
    p.add_argument("--text", metavar="FILE", help="UTF-8 text file scored as one token stream")
    p.add_argument("--lambada", metavar="FILE", help='JSONL file of {"text": ...} examples')
    p.add_argument("--stride", type=int, default=None, help="window advance (default block_size // 2)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="use only the first N tokens of --text (N - 1 are scored)")
    p.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="use only the first N LAMBADA examples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help='print {"text": {tokens, nll, perplexity, ...}, "lambada": {examples, tokens, nll, '
                        'perplexity (per target token), word_perplexity (per example: what '
                        'lm-evaluation-harness calls perplexity), accuracy}}')
    p.set_defaults(run=_run_eval)


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"text file {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise InputError(f"text file {path!r} is not UTF-8 ({e})") from None


def _run_eval(args) -> int:
    import json

    if args.threads is not None:
        set_blas_threads(args.threads)
    from .infer import evaluate

    if args.text is None and args.lambada is None:
        raise InputError("nothing to evaluate: pass --text FILE and/or --lambada FILE")
    if args.max_examples is not None and args.max_examples < 1:
        raise InputError(f"--max-examples must be >= 1, got {args.max_examples}")
    model = _load_for_use(args.model, args.dtype, args.tokenizer, not args.skip_finite_check)
    results = {}
    if args.text is not None:
        ids = model.tokenizer.encode(_read_text_file(args.text))
        results["text"] = evaluate.perplexity(model, ids, stride=args.stride, max_tokens=args.max_tokens,
                                              progress=not args.no_progress)
    if args.lambada is not None:
        examples = evaluate.load_lambada_jsonl(args.lambada)[:args.max_examples]
        results["lambada"] = evaluate.lambada(model, examples, model.tokenizer,
                                              progress=not args.no_progress)
    if args.json:
        _print_json(results)
        return 0
    if "text" in results:
        r = results["text"]
        print(f"text     {r['tokens']:,} tokens scored  nll {r['nll']:.6f}  perplexity {r['perplexity']:.4f}"
              f"  bits/byte {r['bits_per_byte']:.4f}")
    if "lambada" in results:
        r = results["lambada"]
        print(f"lambada  {r['examples']:,} examples ({r['tokens']:,} target tokens)  nll {r['nll']:.6f}  "
              f"perplexity per token {r['perplexity']:.4f}, per word {r['word_perplexity']:.4f} "
              f"(lm-eval's perplexity)  "
              f"accuracy {100 * r['accuracy']:.2f}%")
    return 0


# ------------------------------------------------------------------ trace, trace-compare

def _add_trace(sub) -> None:
    p = sub.add_parser("trace", help="record the 12 validation checkpoints of a greedy run to .npz")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH",
                     help="numgpt checkpoint PREFIX or run folder (its best checkpoint), Hugging "
                          "Face folder, or nanoGPT ckpt.pt")
    src.add_argument("--reference-hf", metavar="FOLDER",
                     help="record with transformers instead (the reference engine; needs "
                          "pip install 'numgpt[reference]')")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text, encoded with the model's tokenizer")
    text.add_argument("--ids", help="prompt token ids, e.g. '15496 13' or '[15496, 13]'")
    p.add_argument("-n", "--steps", dest="n_steps", type=int, default=10,
                   help="greedy tokens to generate, one recorded pass each (default 10)")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="override the model's tokenizer: 'bytes', 'gpt2' (shipped with numgpt) or a "
                        "folder with vocab.json + merges.txt")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute dtype (default float32, what the tolerances are for)")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the recording")
    _add_finite_flag(p)
    p.set_defaults(run=_run_trace)


def _trace_tokenizer(args):
    """--tokenizer, else the one stored with the model (None when it has none)."""
    from .io import checkpoint
    from .io import tokenizer

    if args.tokenizer is not None:
        return tokenizer.load_tokenizer(args.tokenizer)
    return checkpoint.find_tokenizer(args.model or args.reference_hf)[0]


def _run_trace(args) -> int:
    from .io import checkpoint
    from .verify import trace

    tok = _trace_tokenizer(args)
    if args.ids is not None:
        ids = _parse_ids(args.ids)
    elif tok is None:
        raise InputError(f"{args.model or args.reference_hf} has no tokenizer to encode --prompt; "
                         f"pass --ids, or --tokenizer bytes / gpt2 / FOLDER")
    else:
        ids = tok.encode(args.prompt)
    if args.reference_hf is not None:
        from .verify import reference

        hf = reference.load_hf(args.reference_hf, args.dtype)
        recording = reference.record_transformers(hf, ids, args.n_steps, tok)
    else:
        model = checkpoint.load(args.model, dtype=args.dtype, check_finite=not args.skip_finite_check)
        recording = trace.record(model, ids, args.n_steps, tok)
    trace.save_trace(args.out, recording)
    print(f"{trace.describe(recording)}\nwritten to {args.out}")
    return 0


def _add_trace_compare(sub) -> None:
    p = sub.add_parser("trace-compare", help="compare two trace recordings checkpoint by checkpoint; "
                                             "exit 1 on any FAIL, naming the first")
    p.add_argument("a", metavar="A.npz")
    p.add_argument("b", metavar="B.npz")
    p.add_argument("--out", default=None, metavar="FILE.md", help="also write the table as Markdown")
    p.add_argument("--tolerance-scale", type=float, default=1.0, metavar="X",
                   help="multiply every A-vs-B tolerance by X (exact checks stay exact), for "
                        "recordings not meant to agree to float32 rounding, e.g. a q8_0 model "
                        "against its float32 original (default 1)")
    p.add_argument("--atol", action="append", default=[], metavar="CHECKPOINT=VALUE",
                   type=_checkpoint_tolerance,
                   help="set one checkpoint's tolerance (1..11), after --tolerance-scale; "
                        "repeat for several, e.g. --atol 8=0.05 --atol 9=0.05")
    p.set_defaults(run=_run_trace_compare)


def _checkpoint_tolerance(text: str) -> tuple[int, float]:
    """'8=0.05' -> (8, 0.05); the range checks are trace.tolerances'."""
    number, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(number), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CHECKPOINT=VALUE such as 8=0.05, got {text!r}") from None


def _run_trace_compare(args) -> int:
    from .verify import trace

    a, b = trace.load_trace(args.a), trace.load_trace(args.b)
    rows = trace.compare(a, b, tolerance_scale=args.tolerance_scale, atol=dict(args.atol))
    print(f"A: {trace.describe(a)}\nB: {trace.describe(b)}\n\n{trace.format_table(rows)}\n")
    print(trace.summary(rows))
    if args.out:
        trace.write_report(args.out, rows, a, b, heading=f"Trace comparison: {args.a} vs {args.b}")
    return 0 if trace.passed(rows) else 1


# ------------------------------------------------------------ prepare, train, plot, sanity

def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text files into train.bin/val.bin + meta.json for training")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE", help="UTF-8 text files, concatenated in order")
    source.add_argument("--chat", metavar="FILE",
                        help="conversations instead: a JSONL file, one {\"messages\": [{\"role\", "
                             "\"content\"}, ...]} per line (OpenAI's fine-tuning format), rendered "
                             "with the chat template; only assistant tokens carry loss "
                             "(train_mask.bin / val_mask.bin)")
    _add_chat_template_flag(p)
    p.add_argument("--tokenizer", default="bytes", metavar="SPEC",
                   help="'bytes' (default), 'gpt2' (GPT-2's BPE, shipped with numgpt), a folder with "
                        "vocab.json + merges.txt, or a model whose tokenizer to use")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens kept for validation (default 0.1)")
    p.add_argument("--block-size", type=int, default=None,
                   help="refuse splits too small for one window of this context length")
    p.set_defaults(run=_run_prepare)


def _prepare_tokenizer(spec: str):
    """'bytes', a BPE folder, or any model path whose tokenizer ``find_tokenizer`` can read."""
    from .io import checkpoint
    from .io import tokenizer

    try:
        return tokenizer.load_tokenizer(spec)
    except NumGPTError as first:
        try:
            tok, notes = checkpoint.find_tokenizer(spec)
        except NumGPTError:
            raise first from None
        if tok is None:
            raise InputError(f"{spec} carries no tokenizer ({'; '.join(notes)}); pass --tokenizer "
                             f"bytes, gpt2, or a folder with vocab.json + merges.txt") from None
        return tok


def _run_prepare(args) -> int:
    from .io import data

    if args.chat is not None:
        meta = data.prepare_chat(args.chat, _prepare_tokenizer(args.tokenizer), args.out,
                                 args.val_fraction, template=_chat_template(args),
                                 block_size=args.block_size)
        s = meta["splits"]
        print(f"wrote {args.out}: train {s['train']['conversations']:,} conversations "
              f"({s['train']['tokens']:,} tokens, {s['train']['assistant_tokens']:,} carry loss), "
              f"val {s['val']['conversations']:,} ({s['val']['tokens']:,} tokens, "
              f"{s['val']['assistant_tokens']:,} carry loss)")
        return 0
    elif args.chat_template is not None:
        raise InputError("--chat-template applies to --chat conversations; text files are "
                         "tokenized as they are")
    meta = data.prepare(args.input, _prepare_tokenizer(args.tokenizer), args.out, args.val_fraction,
                        block_size=args.block_size)
    s = meta["splits"]
    print(f"wrote {args.out}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']['type']})")
    return 0


def _add_train(sub) -> None:
    from .train.config import config_fields

    p = sub.add_parser("train", help="train a GPT (no flags: a byte-level model on the Python docs, a few minutes)",
                       description="Train from scratch, fine-tune (--init) or continue (--resume). Every key "
                                   "of the training config is a flag; a TOML file (--config) sets many at "
                                   "once and flags override it.")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="flat TOML file of config keys")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="BLAS threads (default: the BLAS library's choice); 1 is fastest on a "
                        "machine whose cores are busy with other work")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        shown = "unset" if f.default is None else f.default
        text = f.help if "default" in f.help else f"{f.help} (default: {shown})"
        if f.name == "workers":
            text = (f"{f.help} (default: one per core, at most 4, with 1 BLAS thread each; 1 with "
                    f"--threads or under mpiexec)")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            p.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), **kwargs)
    p.set_defaults(run=_run_train)


def _tidy_run_folder(out: str) -> None:
    """What a crash left in a run folder (a stale checkpoint .json, temporaries), repaired
    before ``resume_config`` reads it; pure Python, so NumPy still waits for --threads."""
    from .io.files import write_errors
    from .io.recovery import tidy_folder

    with write_errors(out, "nothing was changed"):
        for note in tidy_folder(Path(out)):
            print(f"numgpt: note: {note}", file=sys.stderr)


def _default_workers(batch_size: int) -> int:
    """Data-parallel workers when neither --workers nor --threads is given: one per core this
    process may use, at most 4 (past that the threads wait on each other for Python's GIL)
    and at most batch_size. With 1 BLAS thread each this beat multi-threaded BLAS on 2 cores,
    quiet (41 vs 49 ms per step) and busy alike."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4, batch_size))


def _train_config(args, flags: dict):
    """The training config: the TOML file then the flags; resuming, the run's saved config
    under both (``resume_config``)."""
    from .train.config import TrainConfig, resume_config

    cfg = TrainConfig.from_sources(args.config, flags)
    if cfg.resume:  # the run's saved config, then the file, then the flags
        _tidy_run_folder(cfg.out)
        cfg = resume_config(cfg.out, flags, args.config)
    return cfg


def _run_train(args) -> int:
    from .train.config import TrainConfig, config_fields, load_toml

    flags = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    from .train.launch import launched_rank, launched_ranks

    ranks = launched_ranks()  # under `mpiexec -n N`: N processes share the cores
    if ranks > 1:  # read the config as a group, so a refused one is printed once (rank 0)
        set_blas_threads(args.threads if args.threads is not None else 1)  # before NumPy loads
        from .train.parallel import ranks_from_environment

        cfg = ranks_from_environment(300.0).agree(lambda: _train_config(args, flags), "read the config")
    else:
        cfg = _train_config(args, flags)
    if not cfg.resume and args.threads is None and ranks == 1 and \
            "workers" not in {*flags, *(load_toml(args.config) if args.config else {})}:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "workers": _default_workers(cfg.batch_size)})
    if ranks == 1 and (args.threads is not None or cfg.workers > 1):  # 1 BLAS thread per worker
        set_blas_threads(args.threads if args.threads is not None else 1)
    from .train import loop as training  # loads NumPy: after the thread count is set

    if cfg.data is None and not cfg.resume and not args.quiet and launched_rank() == 0:
        print("numgpt: no --data given: training a byte-level model on the Python docs (pydoc_data)",
              file=sys.stderr)
    result = training.train(cfg, progress=not args.quiet)
    if result.rank != 0:  # under mpiexec rank 0 reports for all
        return 0
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    print(f"trained {result.step} steps into {result.out}: checkpoints latest, best (val loss {best}), "
          f"log.jsonl" + (f", {len(result.plots)} plots" if result.plots else ""))
    if result.sample is not None:
        print("--- sample ---")
        print(result.sample)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="write the PNG plots of a training run from its log.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `numgpt train`")
    p.add_argument("--out", default=None, metavar="DIR", help="write the PNGs here (default RUN_DIR)")
    p.set_defaults(run=_run_plot)


def _run_plot(args) -> int:
    from .train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _add_sanity(sub) -> None:
    p = sub.add_parser("sanity", help="next-token checks: expected vs predicted tokens on real data")
    _add_model_flags(p)
    p.add_argument("--data", required=True, metavar="FILE",
                   help="UTF-8 text file, a .bin from `numgpt prepare` (meta.json beside it), or a prepared folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--next-from-data", type=int, metavar="N", help="check N random positions")
    what.add_argument("--offset", type=int, metavar="OFF", help="check the token at this position")
    p.add_argument("--ctx", type=int, default=None, metavar="T",
                   help="context tokens before each position (default: the model's block_size, at most 256)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="most probable tokens shown (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled positions (default 0)")
    p.add_argument("--preview", type=int, default=12, metavar="N", help="context tokens shown (default 12)")
    p.set_defaults(run=_run_sanity)


def _run_sanity(args) -> int:
    if args.threads is not None:
        set_blas_threads(args.threads)
    from .infer import sanity

    model = _load_for_use(args.model, args.dtype, args.tokenizer, not args.skip_finite_check)
    tokens = sanity.load_tokens(args.data, model.tokenizer)
    if args.offset is not None:
        row = sanity.check_offset(model, tokens, args.offset, ctx=args.ctx, top=args.top)
        print(sanity.format_row(row, model.tokenizer, args.preview))
        return 0
    report = sanity.next_token_checks(model, tokens, args.next_from_data, ctx=args.ctx, top=args.top,
                                      seed=args.seed)
    print(sanity.format_report(report, model.tokenizer, args.preview))
    return 0


# ---------------------------------------------------------------------------- inspect

def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="look inside a model: logit lens, activation patching, "
                                       "ablation, direct logit attribution")
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    helps = {"logit-lens": "what each layer would predict: its residual stream through ln_f and the head",
             "patch": "patch clean activations into a corrupted run: resid per (layer, position), each head",
             "ablate": "zero or mean-ablate each head and MLP: change in loss (or logit difference)",
             "attribute": "each head's and MLP's direct contribution to a token's logit"}
    for name, text in helps.items():
        t = tools.add_parser(name, help=text)
        _add_model_flags(t)
        t.add_argument("--prompt", required=True, help="the prompt text (the clean one for patch)")
        if name == "logit-lens":
            t.add_argument("--target", default=None, help="a one-token text whose probability to show")
            t.add_argument("-k", type=int, default=5, help="top tokens per layer and position (default 5)")
        if name == "patch":
            t.add_argument("--corrupted", required=True, help="the corrupted prompt (same token count)")
        if name in ("patch", "ablate"):
            t.add_argument("--answer", required=name == "patch", default=None,
                           help="the right next token (one-token text)")
            t.add_argument("--wrong", required=name == "patch", default=None,
                           help="the wrong next token (one-token text); metric: logit[answer] - logit[wrong]")
        if name == "ablate":
            t.add_argument("--method", choices=["zero", "mean"], default="zero",
                           help="replace by zero or by the mean over --reference prompts (default zero)")
            t.add_argument("--reference", action="append", default=[], metavar="TEXT",
                           help="a reference prompt for --method mean (repeat for a batch)")
        if name == "attribute":
            t.add_argument("--target", required=True, help="the one-token text whose logit to split")
            t.add_argument("--contrast", default=None, help="a one-token text: split logit[target] - logit[contrast]")
            t.add_argument("--position", type=int, default=-1, help="position in the prompt (default -1, the last)")
        t.add_argument("--json", action="store_true", help="print the result as one JSON object")
        t.add_argument("--png", metavar="FILE.png", default=None, help="also write the heatmap(s) here")
        t.set_defaults(run=_run_inspect)


def _one_token(tok, text: str | None, flag: str) -> int | None:
    """The id of a text that the tokenizer encodes as exactly one token."""
    if text is None:
        return None
    ids = tok.encode(text)
    if len(ids) != 1:
        raise InputError(f"{flag} {text!r} encodes to {len(ids)} tokens {ids}; give a text that is "
                         f"one token (mind the leading space)")
    return ids[0]


def _run_inspect(args) -> int:
    if args.threads is not None:
        set_blas_threads(args.threads)
    from . import inspect

    from .inspect import report

    model = _load_for_use(args.model, args.dtype, args.tokenizer, not args.skip_finite_check)
    tok = model.tokenizer
    ids = tok.encode(args.prompt)
    if args.tool == "logit-lens":
        result = inspect.logit_lens(model, ids, _one_token(tok, args.target, "--target"), args.k)
    elif args.tool == "patch":
        result = inspect.patch(model, ids, tok.encode(args.corrupted), _one_token(tok, args.answer, "--answer"),
                               _one_token(tok, args.wrong, "--wrong"))
    elif args.tool == "ablate":
        reference = [tok.encode(r) for r in args.reference]
        result = inspect.ablate(model, ids, args.method, reference or None,
                                _one_token(tok, args.answer, "--answer"), _one_token(tok, args.wrong, "--wrong"))
    else:
        result = inspect.attribute(model, ids, _one_token(tok, args.target, "--target"), args.position,
                                   _one_token(tok, args.contrast, "--contrast"))
    if args.png:
        report.png(result, args.png, tok)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(report.text(result, tok))
    if args.png:
        print(f"heatmap written to {args.png}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser

_COMMANDS = [_add_compile, _add_gradcheck, _add_convert, _add_quantize, _add_info, _add_tokenize, _add_serve, _add_generate, _add_chat, _add_chat_data, _add_eval, _add_trace, _add_trace_compare, _add_inspect, _add_prepare, _add_train, _add_plot, _add_sanity]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numgpt", description="GPT-2 from first principles on NumPy: train, load, generate, "
                                   "evaluate, trace, serve. `numgpt COMMAND --help` explains each command.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"numgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    for name, p in sub.choices.items():
        if name in _GEMM_COMMANDS or name == "info":
            _add_gemm_flag(p)
    return parser


def _launched_rank() -> int:
    from .train.launch import launched_rank

    return launched_rank()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _note_cold_kernel_cache(args)
    try:
        _note_gemm(args)
        return args.run(args)
    except NumGPTError as exc:
        if not (getattr(exc, "every_rank", False) and _launched_rank() != 0):  # once, not per rank
            print(f"numgpt: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"numgpt: error: out of memory ({exc or 'an allocation failed'}); use a smaller "
              f"model, batch_size or block_size, or a machine with more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("numgpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a disk-full or read-only write a command did not convert itself
        converted = write_error(exc, exc.filename or "a file")
        if converted is exc:
            raise
        print(f"numgpt: error: {converted}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
