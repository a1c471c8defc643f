"""Run ``numgpt serve`` in a subprocess on a free loopback port (tests of the server and
of the playground page share this)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_subprocess(model: str | os.PathLike, log_path: Path, *args: str,
                     api_key: str | None = None, timeout_s: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``numgpt serve --model MODEL ARGS`` (key through NUMGPT_API_KEY), wait until
    /health answers 200, yield (base url, process); terminate it afterwards. Its output
    goes to ``log_path``, shown when it fails to start."""
    port = free_port()
    env = {**os.environ, **({"NUMGPT_API_KEY": api_key} if api_key else {})}
    cmd = [sys.executable, "-m", "numgpt", "serve", "--model", str(model), "--port", str(port),
           *args]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, \
                f"server not healthy in {timeout_s:.0f} s:\n{log_path.read_text()}"
            try:
                if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
