"""Loads of model files under a memory and time bound, for the fuzz suite
(``tests/test_fuzz.py``).

The fuzz property is "loading gives a model, or raises one NumGPTError line, within a time
and memory bound". Loading a hostile file in the test process could take the test run down
(a claimed 2^40-element array grows until the kernel kills the process), so every load runs
in a process of its own: a warm child imports numgpt (and torch, gguf, safetensors) once,
then for each path it reads on stdin forks a worker that caps its address space at what the
imports took plus ``budget_mib`` (``RLIMIT_AS``) and loads the file. The child waits
``timeout`` seconds for the worker's answer (then kills it: ``timeout``), reports a worker
that died without answering as ``killed`` (with the signal), and answers one JSON line per
path. Each file gets a fresh worker, so one hostile file cannot leave debris for the next,
and a fork costs milliseconds where a fresh interpreter importing torch costs seconds.

Outcomes (``Outcome.kind``):

* ``model``: a ``GPT`` whose every stored float (parameters, q8_0 block scales) is finite:
  the loader's finite check is on, so a non-finite weight that got through is a failure
  (``nonfinite``).
* ``error``: one ``NumGPTError`` with a one-line, non-empty message.
* ``multiline``: a ``NumGPTError`` whose message is empty or spans lines.
* ``exception``: any other exception (its type, message and innermost frame).
* ``memory``: ``MemoryError`` (the loader allocated past the bound before refusing).
* ``timeout`` / ``killed``: see above.

Run as a script it is the child; ``LOADERS`` also holds deliberately broken loaders, the
negative controls that show each outcome is detected.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

GOOD = ("model", "error")
BUDGET_MIB = 1024
TIMEOUT_S = 10.0


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kind in GOOD

    def __str__(self) -> str:
        return f"{self.kind} after {self.seconds:.2f} s: {self.detail}"


# ------------------------------------------------------------------------- the child

def _vm_size() -> int:
    """This process's address space in bytes (VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _float_arrays(obj, depth: int = 0):
    """Every numpy float array reachable from a numgpt object (the model, its blocks, its
    q8_0 matrices' scales), not looking into the tokenizer."""
    import numpy as np

    if depth > 8:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            yield obj
        return
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _float_arrays(x, depth + 1)
        return
    if not type(obj).__module__.startswith("numgpt"):
        return
    names = list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ()))
    for name in names:
        if name not in ("tokenizer", "source", "config") and hasattr(obj, name):
            yield from _float_arrays(getattr(obj, name), depth + 1)


def _check_model(model) -> Outcome:
    import numpy as np

    from numgpt.core.model import GPT

    if not isinstance(model, GPT):
        return Outcome("exception", f"the loader returned a {type(model).__name__}, not a GPT")
    arrays = list(_float_arrays(model))
    if not arrays:
        return Outcome("exception", "the loaded model holds no float arrays")
    bad = sum(int(np.count_nonzero(~np.isfinite(a))) for a in arrays)
    if bad:
        return Outcome("nonfinite", f"a model with {bad} non-finite stored values loaded "
                                    f"although the finite check is on")
    return Outcome("model", f"n_layer {model.config.n_layer}, {len(arrays)} float arrays")


def _innermost(tb) -> str:
    """Where an exception came from: the innermost frame in numgpt's own code (the line to
    fix), else the innermost frame."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return ""
    ours = [f for f in frames if f"{os.sep}numgpt{os.sep}" in f.filename]
    f = (ours or frames)[-1]
    return f" at {Path(f.filename).name}:{f.lineno} ({f.name})"


def _load_once(loader, path: str) -> Outcome:
    from numgpt.errors import NumGPTError

    try:
        model = loader(path)
    except NumGPTError as e:
        msg = str(e)
        if not msg or "\n" in msg or "\r" in msg:
            return Outcome("multiline", f"{type(e).__name__}: {msg!r}")
        return Outcome("error", f"{type(e).__name__}: {msg[:300]}")
    except MemoryError as e:
        return Outcome("memory", f"MemoryError{_innermost(e.__traceback__)}")
    except RecursionError as e:
        return Outcome("exception", f"RecursionError{_innermost(e.__traceback__)}")
    except Exception as e:  # anything else is what the fuzz suite is looking for
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return Outcome("exception", f"{type(e).__name__}: {first}{_innermost(e.__traceback__)}")
    return _check_model(model)


# Deliberately broken loaders, for the negative controls (see tests/test_fuzz.py).
def _hang(path):
    while True:
        time.sleep(0.05)


def _die(path):
    os.kill(os.getpid(), signal.SIGKILL)


def _grow(path):
    import numpy as np

    return [np.empty(1 << 30, np.uint8) for _ in range(1 << 10)]  # 1 TiB, a GiB at a time


def _chatty(path):
    print("a loader that prints to stdout\n{\"kind\": \"model\"}", flush=True)
    return _bare(path)


def _bare(path):
    raise ValueError("a bare ValueError from a loader")


def _two_lines(path):
    from numgpt.errors import CheckpointError

    raise CheckpointError("first line\nsecond line")


def _nan_model(path):
    import numpy as np

    from numgpt.core.model import GPT, GPTConfig

    m = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4), seed=0)
    next(iter(m.parameters().values())).data[0] = np.nan
    return m


def _numgpt_load(path):
    """What ``numgpt info`` / ``generate`` / ``serve`` do with a path: find its tokenizer
    without the weights (held to the same property: a result or one NumGPTError line),
    then load it."""
    from numgpt.errors import NumGPTError
    from numgpt.io.checkpoint import find_tokenizer, load

    try:
        find_tokenizer(path)
    except NumGPTError as e:
        if not str(e) or "\n" in str(e):
            raise
    return load(path)


LOADERS = {"load": _numgpt_load, "hang": _hang, "die": _die, "grow": _grow, "bare": _bare,
           "chatty": _chatty,
           "two_lines": _two_lines, "nan_model": _nan_model}


def _serve_one(request: dict, limit: int) -> dict:
    """Fork a worker that caps its address space at ``limit`` and loads one path; wait for
    its answer at most ``request["timeout"]`` seconds (then kill it)."""
    import resource
    import select

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # stdout is the child's answer channel: a loader's print must not reach it
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            t = time.perf_counter()
            out = _load_once(LOADERS[request.get("loader", "load")], request["path"])
            answer = {"kind": out.kind, "detail": out.detail, "seconds": time.perf_counter() - t}
        except BaseException as e:  # noqa: BLE001  (a failure of the harness itself)
            answer = {"kind": "exception", "detail": f"in the fuzz worker: {e!r}"[:300]}
        os.write(w, json.dumps(answer).encode())
        os._exit(0)
    os.close(w)
    t = time.perf_counter()
    deadline, chunks, timed_out = time.monotonic() + request["timeout"], [], False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
            break
        if select.select([r], [], [], left)[0]:
            data = os.read(r, 1 << 16)
            if not data:
                break
            chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    took = time.perf_counter() - t
    if timed_out:
        return {"kind": "timeout", "detail": f"no answer in {request['timeout']:g} s", "seconds": took}
    if not chunks:
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit {os.WEXITSTATUS(status)}")
        return {"kind": "killed", "detail": f"the worker died ({how})", "seconds": took}
    return json.loads(b"".join(chunks))


def child_main(budget_mib: int) -> None:
    """The warm parent of the workers: imports what the loaders use once (a forked worker
    starts with them), then answers one line per request line."""
    import gguf  # noqa: F401
    import numpy  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import torch  # noqa: F401

    import numgpt.io.checkpoint  # noqa: F401
    import numgpt.io.gguf  # noqa: F401

    limit = _vm_size() + budget_mib * (1 << 20)
    print(json.dumps({"ready": limit}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve_one(json.loads(line), limit)), flush=True)


# ------------------------------------------------------------------------ the parent

class LoaderChild:
    """The parent's side: ``load(path)`` -> ``Outcome``.

    The child runs with one BLAS/OpenMP thread and two malloc arenas, so a worker's address
    space is the model's memory and not per-thread reservations. Its answers are read on a
    thread and waited for on a queue; should the child itself stop answering (it never loads
    anything, so it should not), it is killed and a fresh one takes the next file."""

    def __init__(self, budget_mib: int = BUDGET_MIB, timeout_s: float = TIMEOUT_S,
                 start_timeout_s: float = 120.0):
        self.budget_mib, self.timeout_s, self.start_timeout_s = budget_mib, timeout_s, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.starts = 0

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.budget_mib)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        self.starts += 1
        first = self._next(self.start_timeout_s)
        if not isinstance(first, dict) or "ready" not in first:
            self.close()
            raise RuntimeError(f"the fuzz loader child did not start: {first!r}")

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for raw in proc.stdout:
            try:
                lines.put(json.loads(raw))
            except ValueError:
                lines.put({"kind": "exception", "detail": f"the child wrote {raw[:200]!r}"})
        lines.put(None)  # end of stream: the child exited

    def _next(self, timeout: float):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "timeout"

    def load(self, path: str | os.PathLike, loader: str = "load",
             timeout_s: float | None = None) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request = {"path": str(path), "loader": loader, "timeout": timeout}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: its end of stream is in the queue
        answer = self._next(timeout + 60)
        if not isinstance(answer, dict):
            self.close()
            return Outcome("killed", f"the fuzz child itself stopped answering ({answer})")
        return Outcome(answer["kind"], answer["detail"], answer.get("seconds", 0.0))

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.proc = None


if __name__ == "__main__":
    child_main(int(sys.argv[1]) if len(sys.argv) > 1 else BUDGET_MIB)
