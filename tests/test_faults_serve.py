"""The server's share of the fault table (issue 10: items 3-serve, 5, 6, 7, 10, 12; issue 20:
groups 4 and 8), each case
against a real ``numgpt serve`` subprocess driven over raw sockets or httpx, as a hostile
client or a careless operator would. Every case writes its row (what happened, what is
expected, PASS/FAIL) to ``docs/results/faults.md`` through ``tests/results_table.py``.

No case asserts a wall-clock time. The one about the event loop counts how many small
requests the server answers while big prompts are being tokenized (a loop that tokenizes
answers none of them until it is done); the timings it saw are written to the table only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from numgpt.core.model import GPT, GPTConfig
from numgpt.io.checkpoint import save
from numgpt.io.tokenizer import ByteTokenizer, GPT2Tokenizer

import results_table
from servers import REPO, free_port, serve_subprocess

HEADER_TIMEOUT = 1.0  # --header-timeout of the shared server, seconds
BODY_TIMEOUT = 3.0  # --body-timeout
MAX_CONNECTIONS = 8  # --max-connections
MAX_CHARS = 4000  # --max-prompt-chars
WAIT = 15.0  # how long a test waits for something the server must do "soon" (not a gate)


def record(case: str, happened: str, expected: str, ok: bool) -> None:
    """Write the case's row, then fail the test if it did not hold."""
    results_table.record("faults.md", case, happened, expected, "PASS" if ok else "FAIL")
    assert ok, f"{case}: {happened} (expected: {expected})"


def _byte_model_path(folder: Path) -> Path:
    m = GPT(GPTConfig(vocab_size=256, block_size=256, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=5)
    m.tokenizer = ByteTokenizer()
    return save(m, folder / "tiny")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return _byte_model_path(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """One server with short timeouts and small limits, shared by the cases that leave it
    running. Yields (url, process, log path)."""
    log = tmp_path_factory.mktemp("faults-log") / "server.log"
    args = ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
            "--max-connections", str(MAX_CONNECTIONS), "--max-prompt-chars", str(MAX_CHARS),
            "--log-level", "info"]
    with serve_subprocess(model_path, log, *args) as (url, proc):
        yield url, proc, log


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _post_raw(url: str, body: bytes, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, content=body, timeout=30,
                      headers={"Content-Type": "application/json"})


def _open_upload(url: str, declared: int, sent: int, path: str = "/v1/completions") -> socket.socket:
    """A connection that announces a ``declared``-byte JSON body and sends ``sent`` bytes of it."""
    s = socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + b" " * sent)
    return s


def _answer_or_close(s: socket.socket) -> bytes:
    """What the server sends before closing, b"" if it closes silently; raises
    socket.timeout if it does neither within WAIT seconds."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:  # closed with our unread bytes pending: a reset
            return data
        if not chunk:
            return data
        data += chunk
        if b"\r\n\r\n" in data and b"408" in data.split(b"\r\n", 1)[0]:
            return data


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _completion_ok(url: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4,
                                                     "temperature": 0}, timeout=30,
                      headers=headers or {})


# ------------------------------------------------------------- item 7: lone surrogates


SURROGATES = [
    ("stop", b'{"prompt": "x", "stop": ["\\ud800"]}'),
    ("prompt", b'{"prompt": ["ok", "a\\udfffb"]}'),
    ("model", b'{"prompt": "x", "model": "\\ud83d"}'),
    ("\\udc80", b'{"prompt": "x", "\\udc80": 1}'),  # even an unknown field's name
]


def test_lone_surrogates_are_400_naming_the_field(server):
    url, _, log = server
    seen, ok = [], True
    for field, body in SURROGATES:
        r = _post_raw(url, body)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith(
            "application/json") else {}
        seen.append(f"{field}: {r.status_code} param={err.get('param')}")
        ok &= r.status_code == 400 and err.get("param") == field and "surrogate" in err["message"]
    r = _post_raw(url, b'{"prompt": "\\ud800"}', "/tokenize")
    seen.append(f"/tokenize prompt: {r.status_code}")
    ok &= r.status_code == 400
    ok &= "Traceback" not in log.read_text()
    record("7 lone surrogate in stop, prompt, model, a key, /tokenize",
           "; ".join(seen) + ("; no traceback logged" if "Traceback" not in log.read_text()
                              else "; traceback logged"),
           "400 naming the field, no traceback", ok)
    assert _completion_ok(url).status_code == 200  # and the server keeps serving


# ------------------------------------------------------------ item 5: big prompts


def test_a_prompt_past_the_character_cap_is_400_naming_the_limit(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "a" * (MAX_CHARS + 1),
                                                  "truncate": True}, timeout=30)
    err = r.json().get("error", {})
    ok = (r.status_code == 400 and err.get("code") == "prompt_too_long"
          and str(MAX_CHARS) in err.get("message", "") and "--max-prompt-chars" in err["message"])
    record("5 prompt past --max-prompt-chars", f"{r.status_code}: {err.get('message')}",
           "400 prompt_too_long naming the limit and the flag", ok)
    ids = httpx.post(url + "/v1/completions", json={"prompt": [65] * (8 * 256 + 1),
                                                    "truncate": True}, timeout=30)
    err = ids.json().get("error", {})
    record("5 token-id prompt past --max-prompt-tokens (default 8 x context)",
           f"{ids.status_code}: {err.get('message')}", "400 prompt_too_long naming the limit",
           ids.status_code == 400 and err.get("code") == "prompt_too_long" and "2048" in err["message"])
    control = httpx.post(url + "/v1/completions", json={"prompt": "a" * 2000,
                                                        "truncate": True, "max_tokens": 1}, timeout=30)
    assert control.status_code == 200, control.text  # under both caps: accepted


@pytest.fixture(scope="module")
def bpe_model_path(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    m = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=1)
    m.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    return save(m, tmp_path_factory.mktemp("faults-bpe") / "bpe")


def test_huge_prompts_do_not_stall_other_clients(bpe_model_path, tmp_path):
    """Four clients each send a 1 MB prompt (GPT-2 BPE, kept by "truncate"); meanwhile a
    probe asks /health again and again. Tokenizing on the event loop answers no probe while
    a prompt is being tokenized (about 0.2-1 s each); off the loop, the probes keep coming."""
    text = ("The quick brown fox jumps over the lazy dog, again and again. " * 17000)[:1_000_000]
    body = json.dumps({"prompt": text, "truncate": True, "max_tokens": 1}).encode()
    args = ["--max-prompt-chars", "2000000", "--max-prompt-tokens", "1000000",
            "--max-body-bytes", str(4 << 20),
            "--log-level", "warning"]
    with serve_subprocess(bpe_model_path, tmp_path / "server.log", *args) as (url, proc):
        _post_raw(url, body)  # warm up (first tokenizer use)
        t0 = time.perf_counter()
        assert _completion_ok(url).status_code == 200
        idle_latency = time.perf_counter() - t0
        statuses: list[int] = []

        def big() -> None:
            statuses.append(_post_raw(url, body).status_code)

        clients = [threading.Thread(target=big) for _ in range(4)]
        for c in clients:
            c.start()
        time.sleep(0.05)  # the uploads are under way
        probes, worst = 0, 0.0
        with httpx.Client(base_url=url, timeout=30) as h:
            while any(c.is_alive() for c in clients):
                t = time.perf_counter()
                if h.get("/health").status_code == 200:
                    probes += 1
                worst = max(worst, time.perf_counter() - t)
            t0 = time.perf_counter()
        for c in clients:
            c.join()
        t0 = time.perf_counter()
        normal = _completion_ok(url).status_code
        after = time.perf_counter() - t0
    ok = statuses == [200] * 4 and probes >= 16 and normal == 200
    record("5 four clients send 1 MB prompts while others ask",
           f"4 big requests {sorted(set(statuses))}; {probes} /health probes answered meanwhile "
           f"(slowest {worst:.3f} s; a normal request {idle_latency:.3f} s idle, {after:.3f} s "
           f"after; shared busy machine, not gated)",
           "tokenized off the event loop: other clients keep being answered (>= 16 probes)", ok)


# ------------------------------------------------- item 6: slow clients, connection limit


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    url, proc, _ = server
    silent = socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT)
    partial = socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finish
    half = _open_upload(url, 100_000, 50_000)
    outcomes = []
    for name, s in (("silent", silent), ("half headers", partial), ("half body", half)):
        try:
            got = _answer_or_close(s)
            outcomes.append((name, got.split(b"\r\n", 1)[0].decode() if got else "closed"))
        except socket.timeout:
            outcomes.append((name, f"still open after {WAIT:.0f} s"))
        finally:
            s.close()
    ok = (outcomes[0][1] == "closed" and outcomes[1][1] == "closed"
          and "408" in outcomes[2][1])
    record("6 client sends no headers / half the headers / half the body, then waits",
           "; ".join(f"{n}: {o}" for n, o in outcomes),
           f"closed after --header-timeout {HEADER_TIMEOUT:g} s; 408 after --body-timeout "
           f"{BODY_TIMEOUT:g} s", ok)
    assert _completion_ok(url).status_code == 200


def test_connection_limit_bounds_held_bodies_and_memory(server):
    """MAX_CONNECTIONS + 4 clients each send half of a 1 MB body and wait. uvicorn counts the
    open connections when a request's headers arrive: past the limit it answers 503, so
    at most MAX_CONNECTIONS - 1 bodies are ever held; those get 408 at the body timeout."""
    url, proc, _ = server
    before = _rss_kb(proc.pid)
    held = [_open_upload(url, 1 << 20, 512 * 1024) for _ in range(MAX_CONNECTIONS + 4)]
    time.sleep(0.5)
    during = _rss_kb(proc.pid)
    answers = []
    for s in held:
        try:
            got = _answer_or_close(s)
            answers.append(got.split(b"\r\n", 1)[0].decode()[9:] if got else "closed")
        except socket.timeout:
            answers.append("still open")
        finally:
            s.close()
    recovered = _completion_ok(url)
    refused = sum("503" in a for a in answers)
    held_to_timeout = sum("408" in a for a in answers)
    grown_mb = (during - before) / 1024
    ok = (refused >= 5 and held_to_timeout <= MAX_CONNECTIONS - 1 and "still open" not in answers
          and recovered.status_code == 200 and grown_mb < 64)
    counts = {a: answers.count(a) for a in sorted(set(answers))}
    record(f"6 {MAX_CONNECTIONS + 4} connections each hold half of a 1 MB body",
           f"answers {counts}; then a request: {recovered.status_code}; server memory "
           f"{before // 1024} -> {during // 1024} MB while held",
           f"503 past --max-connections {MAX_CONNECTIONS}, held bodies cut off (408), memory "
           f"bounded (< 64 MB growth), then served again", ok)


# ---------------------------------------------------- item 12: drops during upload


def test_a_client_dropping_out_mid_upload_logs_one_line_at_most(server):
    url, _, log = server
    drops = 20
    lines_before = len(log.read_text().splitlines())
    for _ in range(drops):
        s = _open_upload(url, 100_000, 30_000)
        time.sleep(0.01)
        s.close()
    assert _completion_ok(url).status_code == 200
    time.sleep(0.3)
    added = log.read_text().splitlines()[lines_before:]
    added = [line for line in added if '"POST /v1/completions HTTP/1.1" 200' not in line]
    ok = len(added) <= drops and not any("Traceback" in line for line in added)
    record("12 client drops out during upload (20 times)",
           f"{len(added)} log lines, {'no' if ok else 'with'} traceback",
           "one line per drop at most, no traceback", ok)


# ------------------------------------------------------------- item 10: the API key


KEY = "clé-ünïcode-κλειδί"


def _start(model_path: Path, log: Path, *args: str, env: dict | None = None) -> tuple[str, subprocess.Popen]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "numgpt", "serve", "--model", str(model_path),
                                 "--port", str(port), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    return f"http://127.0.0.1:{port}", proc


def _wait_listening(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"server not up in 60 s:\n{log.read_text()}"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code in (200, 401):
                if httpx.get(url + "/health", timeout=2, headers={
                        "Authorization": b"Bearer " + KEY.encode()}).status_code == 200:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_a_non_ascii_api_key_matches_its_utf8_bytes(model_path, tmp_path):
    log = tmp_path / "server.log"
    url, proc = _start(model_path, log, "--api-key", KEY)
    try:
        _wait_listening(url, proc, log)
        right = _completion_ok(url, {"Authorization": b"Bearer " + KEY.encode("utf-8")})
        wrong = _completion_ok(url, {"Authorization": b"Bearer " + KEY.encode("utf-8")[:-1]})
        latin = _completion_ok(url, {"Authorization": b"Bearer " + KEY.encode("utf-8", "replace")
                                     .decode("utf-8").encode("latin-1", "replace")})
        none = _completion_ok(url)
    finally:
        _stop(proc)
    ok = (right.status_code, wrong.status_code, latin.status_code, none.status_code) == (200, 401, 401, 401)
    record("10 --api-key with non-ASCII characters",
           f"right key (UTF-8): {right.status_code}; a byte short: {wrong.status_code}; "
           f"Latin-1 spelling: {latin.status_code}; no key: {none.status_code}",
           "200 for the key's UTF-8 bytes, 401 otherwise", ok)


@pytest.mark.parametrize("how", ["--api-key ''", "NUMGPT_API_KEY=''"])
def test_an_empty_api_key_is_refused_at_startup(model_path, tmp_path, how):
    log = tmp_path / "server.log"
    args, env = (["--api-key", ""], None) if how.startswith("--") else ([], {"NUMGPT_API_KEY": ""})
    url, proc = _start(model_path, log, *args, env=env)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
        serving = "serving"
        try:
            serving += f" (/health without a key: {httpx.get(url + '/health', timeout=5).status_code})"
        except httpx.TransportError:
            pass
    finally:
        _stop(proc)
    lines = log.read_text().strip().splitlines()
    # every computing command names its GEMM library first (issue 19); the error is one line
    named = bool(lines) and lines[0].startswith("numgpt: GEMM library ")
    out = "\n".join(lines[1:] if named else lines)
    ok = named and code not in (None, 0) and "API key" in out and "Traceback" not in out \
        and len(lines) == 2
    record(f"10 empty API key ({how})",
           f"exit {code}: {out.strip()[:120]}" if code is not None else serving,
           "refused at startup: one-line error, non-zero exit", ok)


# ------------------------------------------------------------------- item 3: SIGTERM


def test_sigterm_finishes_in_flight_requests_and_exits_0(model_path, tmp_path):
    log = tmp_path / "server.log"
    with serve_subprocess(model_path, log, "--grace-period", "5", "--body-timeout", "60",
                          "--log-level", "info") as (url, proc):
        result: dict = {}

        def in_flight() -> None:
            r = httpx.post(url + "/v1/completions", timeout=30, json={
                "prompt": "Once", "max_tokens": 8, "temperature": 0, "stream": True})
            result["status"], result["done"] = r.status_code, r.text.rstrip().endswith("[DONE]")

        t = threading.Thread(target=in_flight)
        t.start()
        stuck = _open_upload(url, 100_000, 10)  # never finishes: cancelled after the grace period
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(5 + WAIT)
        except subprocess.TimeoutExpired:
            code = None
        t.join(30)
        stuck.close()
    logged = log.read_text()
    ok = (code == 0 and result.get("status") == 200 and result.get("done")
          and "Traceback" not in logged)
    record("3 SIGTERM to numgpt serve with a stream and a stuck upload in flight",
           f"exit status {code}; the stream: {result.get('status')}, "
           f"{'finished with [DONE]' if result.get('done') else 'cut'}; "
           f"{'a traceback' if 'Traceback' in logged else 'no traceback'} in the log",
           "stops accepting, the stream finishes, the stuck upload is cancelled after "
           "--grace-period (one log line), exit 0", ok)


# ---------------------------------------------- issue 20 group 8: the server's edges


def test_a_dns_rebinding_host_is_refused_and_allowed_hosts_admits_it(server, model_path, tmp_path):
    """A page on evil.example whose name an attacker re-points at 127.0.0.1 sends
    ``Host: evil.example`` to the keyless loopback server; only IP addresses, loopback
    names and ``--allowed-hosts`` are answered."""
    url, _, _ = server
    evil = {"Host": "evil.example:8000"}
    page = httpx.get(url + "/", headers=evil, timeout=30)
    api = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                     headers=evil, timeout=30)
    named = httpx.get(url + "/health", headers={"Host": f"localhost:{_port(url)}"}, timeout=30)
    err = api.json().get("error", {}) if api.status_code == 400 else {}
    with serve_subprocess(model_path, tmp_path / "allowed.log", "--allowed-hosts",
                          "models.example,evil.example") as (url2, _):
        allowed = httpx.get(url2 + "/health", headers=evil, timeout=30).status_code
        other = httpx.get(url2 + "/health", headers={"Host": "other.example"}, timeout=30).status_code
    ok = (page.status_code == 400 and api.status_code == 400
          and err.get("code") == "host_not_allowed" and "--allowed-hosts" in err.get("message", "")
          and named.status_code == 200 and _completion_ok(url).status_code == 200
          and (allowed, other) == (200, 400))
    record("20.8 Host: evil.example (DNS rebinding) to a keyless server on 127.0.0.1",
           f"page {page.status_code}, API {api.status_code} {err.get('code')}; localhost and "
           f"127.0.0.1 {named.status_code}; with --allowed-hosts evil.example: {allowed} "
           f"(other.example {other})",
           "400 host_not_allowed naming --allowed-hosts; IPs, loopback names and the allowed "
           "names answered", ok)


def test_sigterm_past_the_grace_period_answers_json_and_logs_no_traceback(tmp_path):
    """Requests still running when --grace-period ends: a plain one gets a JSON 503, a
    stream an error event and a proper end, and the log holds no traceback (it held "Task
    exception was never retrieved", and the plain client got a text/plain 500)."""
    m = GPT(GPTConfig(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128), seed=3)
    m.tokenizer = ByteTokenizer()
    path = save(m, tmp_path / "slow")
    log = tmp_path / "server.log"
    long = {"prompt": "Once", "max_tokens": 240, "n": 16}  # 3840 steps in one slot: seconds
    with serve_subprocess(path, log, "--grace-period", "1", "--max-batch", "1",
                          "--log-level", "info") as (url, proc):
        seen: dict = {}

        def ask(name: str, body: dict) -> None:
            try:
                r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                seen[name] = r
            except httpx.HTTPError as e:
                seen[name] = e

        clients = [threading.Thread(target=ask, args=("plain", long)),
                   threading.Thread(target=ask, args=("stream", {**long, "stream": True}))]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 60  # a busy machine may take a while to start them
        while "numgpt_active_slots 1" not in httpx.get(url + "/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the requests never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            code = None
        for c in clients:
            c.join(30)
    logged = log.read_text()
    plain, stream = seen.get("plain"), seen.get("stream")
    plain_ok = (isinstance(plain, httpx.Response) and plain.status_code == 503
                and plain.headers.get("content-type") == "application/json"
                and plain.json()["error"]["code"] == "shutting_down")
    events = ([e for e in stream.text.split("\n\n") if e]
              if isinstance(stream, httpx.Response) else [])
    last = json.loads(events[-1][len("data: "):]) if events else {}
    stream_ok = (isinstance(stream, httpx.Response) and stream.status_code == 200
                 and last.get("error", {}).get("code") == "shutting_down")
    noise = [w for w in ("Traceback", "never retrieved", "ASGI callable returned") if w in logged]
    describe = (lambda r: f"{r.status_code} {r.headers.get('content-type')}"
                if isinstance(r, httpx.Response) else type(r).__name__)
    record("20.8 SIGTERM with a plain request and a stream running past --grace-period",
           f"exit {code}; plain: {describe(plain)}; stream: {describe(stream)}, last event "
           f"{'an error ' + last['error']['code'] if 'error' in last else 'cut'}; log: "
           f"{', '.join(noise) if noise else 'no traceback'}",
           "plain: 503 JSON shutting_down; stream: an error event, then the body ends; no "
           "traceback; exit 0", code == 0 and plain_ok and stream_ok and not noise)


def test_internals_checks_the_character_cap_before_tokenizing(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/internals", json={"prompt": "a" * (MAX_CHARS + 1)}, timeout=30)
    msg = r.json().get("error", {}).get("message", "")
    ok = r.status_code == 400 and f"{MAX_CHARS + 1} characters" in msg and "--max-prompt-chars" in msg
    record("20.8 /v1/internals prompt past --max-prompt-chars",
           f"{r.status_code}: {msg}", "400 naming the character cap, before tokenizing", ok)


def test_every_static_response_carries_the_pages_security_headers(server):
    url, _, _ = server
    want = {"content-security-policy": "default-src 'self'; frame-ancestors 'none'",
            "x-frame-options": "DENY", "x-content-type-options": "nosniff"}
    missing = {}
    for path in ("/", "/static/index.html", "/static/playground.js", "/static/playground.css"):
        r = httpx.get(url + path, timeout=30)
        wrong = [k for k, v in want.items() if r.headers.get(k) != v]
        if r.status_code != 200 or wrong:
            missing[path] = f"{r.status_code} {wrong}"
    record("20.8 security headers on the page and on /static/ files",
           f"missing: {missing}" if missing else "CSP with frame-ancestors 'none', "
           "X-Frame-Options DENY and nosniff on /, /static/index.html, .js, .css",
           "the same headers on every static response", not missing)


# ------------------------------------------- issue 20 group 4: non-finite log-probabilities


def test_a_model_whose_logits_overflow_gets_one_clear_error_and_strict_json(tmp_path):
    """ln_f.weight = 3e38 passes the finite-weight check at load; the forward pass gives
    NaN logits. Plain and echo-scoring requests were a 500 with a traceback in the log,
    the stream sent ``NaN`` (not JSON), and greedy generation sent NUL bytes."""
    m = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=5)
    m.tokenizer = ByteTokenizer()
    m.ln_f.weight.data[:] = 3e38
    path = save(m, tmp_path / "overflow")
    log = tmp_path / "server.log"
    plain = {"prompt": "Hi", "max_tokens": 3}
    cases = {"plain": plain, "greedy": {**plain, "temperature": 0},
             "logprobs": {**plain, "logprobs": 1},
             "echo-scoring": {"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 1}}
    with serve_subprocess(path, log, "--log-level", "info") as (url, _):
        answers = {k: _post_raw(url, json.dumps(b).encode()) for k, b in cases.items()}
        stream = _post_raw(url, json.dumps({**plain, "stream": True, "logprobs": 1}).encode())
        alive = httpx.get(url + "/health", timeout=30).status_code
    codes = {k: (r.status_code, r.json().get("error", {}).get("code")
                 if r.headers.get("content-type") == "application/json" else r.text[:20])
             for k, r in answers.items()}
    strict = True
    try:
        events = [json.loads(e[len("data: "):], parse_constant=lambda c: 1 / 0)
                  for e in stream.text.split("\n\n") if e]
    except (ValueError, ZeroDivisionError):
        strict, events = False, []
    last = events[-1].get("error", {}).get("code") if events else None
    logged = log.read_text()
    ok = (all(c == (500, "non_finite_logits") for c in codes.values()) and strict
          and last == "non_finite_logits" and "Traceback" not in logged and alive == 200)
    record("20.4 model whose logits overflow (ln_f.weight = 3e38): plain, greedy, logprobs, "
           "echo-scoring, stream",
           f"{codes}; stream {'strict JSON' if strict else 'not JSON (NaN)'}, last event "
           f"{last}; {'a traceback' if 'Traceback' in logged else 'no traceback'} in the log",
           "500 non_finite_logits naming the overflow, strict JSON everywhere, no traceback",
           ok)


# ------------------------------------------------------------ the shared table writer


def test_results_table_merges_rows_by_case(tmp_path):
    results_table.record("faults.md", "b case", "x", "y", "PASS", folder=tmp_path)
    results_table.record("faults.md", "a | piped", "x", "y", "PASS", folder=tmp_path)
    results_table.record("faults.md", "b case", "changed", "y", "FAIL", folder=tmp_path)
    rows = results_table.read_rows("faults.md", tmp_path)
    assert list(rows) == ["a \\| piped", "b case"]
    assert rows["b case"] == "| b case | changed | y | FAIL |"
    text = (tmp_path / "faults.md").read_text()
    assert text.count("| case | what happens | expected | result |") == 1
    with pytest.raises(ValueError):  # a row with the wrong number of cells is refused
        results_table.record("faults.md", "c", "only one cell", folder=tmp_path)
