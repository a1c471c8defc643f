"""``numgpt serve`` end to end: the real server in a subprocess on a free loopback port,
driven by the official ``openai`` client and by raw HTTP (httpx).

The reference for every completion is offline generation (``numgpt.infer.sample.generate``) on
the same checkpoint loaded in the test process. The model is a tiny random-weight
byte-level GPT in float64 (batched and single-row arithmetic then cannot flip an argmax),
saved as a numgpt checkpoint into a temporary folder. In-process tests (Starlette's
TestClient, no network) cover what a subprocess cannot show: /health before the model is
loaded, the catch-all 500, a full queue, and the GPT-2 BPE tokenizer.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import numgpt
from numgpt.io.checkpoint import save
from numgpt.core.model import GPT, GPTConfig
from numgpt.infer.sample import SamplingParams, generate, sample_rng
from numgpt.io.tokenizer import ByteTokenizer
from servers import REPO, serve_subprocess

KEY = "test-key-0123"
NAME = "tiny-test"
LIMIT = 240  # --max-tokens-limit
BODY_LIMIT = 65536  # --max-body-bytes
GREEDY = SamplingParams(temperature=0.0)


def _tiny_model(block_size=256, seed=5) -> GPT:
    m = GPT(GPTConfig(vocab_size=256, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=seed)
    m.tokenizer = ByteTokenizer()
    return m


class Served:
    def __init__(self, url, prefix, proc, log):
        self.url, self.prefix, self.proc, self.log = url, prefix, proc, log
        self.model = numgpt.load(prefix)

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {KEY}"})

    def metrics(self) -> dict[str, float]:
        with self.http() as h:
            text = h.get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    prefix = save(_tiny_model(), folder / "tiny")
    log_path = folder / "server.log"
    with serve_subprocess(prefix, log_path, "--max-batch", "8", "--max-queue", "32",
                          "--max-tokens-limit", str(LIMIT), "--model-name", NAME,
                          "--max-body-bytes", str(BODY_LIMIT), "--log-level", "warning",
                          api_key=KEY) as (url, proc):
        yield Served(url, prefix, proc, log_path)


def offline(served, prompt: str, n: int, params=GREEDY, index=0, stop=None) -> str:
    ids = generate(served.model, list(prompt.encode()), n, params, stop=stop,
                   rng=sample_rng(params.seed, index))
    return bytes(ids).decode("utf-8", "replace")


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------ basic endpoints


def test_health_models_and_auth(served):
    """Every API route needs the key; the probes /health and /metrics do not (load
    balancers and Prometheus call them without credentials, as with llama-server and vLLM)."""
    with served.http() as h:
        assert h.get("/health").json()["status"] == "ok"
        models = h.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert served.client().models.list().data[0].id == NAME
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(served.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        _assert_openai_error(r, 401, code="invalid_api_key")
        _assert_openai_error(httpx.get(served.url + "/v1/models", headers=headers), 401)
        health = httpx.get(served.url + "/health", headers=headers)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        probe = httpx.get(served.url + "/metrics", headers=headers)
        assert probe.status_code == 200 and "numgpt_tokens_generated_total" in probe.text
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").completions.create(model=NAME, prompt="x", max_tokens=1)


def test_greedy_completion_equals_offline_generate(served):
    out = served.client().completions.create(model=NAME, prompt="Hello there", max_tokens=20,
                                             temperature=0)
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.text == offline(served, "Hello there", 20)
    assert choice.finish_reason == "length" and choice.index == 0 and choice.logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 20, 31)


def _ids_from_logprobs(tokens: list[str]) -> list[int]:
    """Byte-level token ids back from OpenAI's token strings (``bytes:\\xNN`` or text)."""
    out = []
    for t in tokens:
        out += [int(h, 16) for h in t[6:].split("\\x")[1:]] if t.startswith("bytes:") else list(t.encode())
    return out


@pytest.mark.parametrize("flags,body", [
    (["--temperature", "0"], {"temperature": 0}),
    (["--temperature", "0.9", "--top-k", "40", "--seed", "77", "--num-samples", "2"],
     {"temperature": 0.9, "top_k": 40, "seed": 77, "n": 2}),
], ids=["greedy", "seeded-n2"])
def test_served_tokens_equal_the_numgpt_generate_command(served, flags, body):
    cmd = [sys.executable, "-m", "numgpt", "generate", "--model", str(served.prefix), "--prompt",
           "Hello there", "-n", "20", "--json", *flags]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    offline_samples = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    with served.http() as h:
        out = h.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 20,
                                              "logprobs": 0, **body}).json()
    assert len(out["choices"]) == len(offline_samples)
    for choice, sample in zip(out["choices"], offline_samples):
        assert _ids_from_logprobs(choice["logprobs"]["tokens"]) == sample["generated_ids"]
        assert choice["text"] == sample["text"]


def test_streaming_sends_one_chunk_per_token_then_done(served):
    stream = served.client().completions.create(model=NAME, prompt="Once upon", max_tokens=12,
                                                temperature=0, stream=True)
    chunks = list(stream)
    tokens = [c for c in chunks if c.choices[0].finish_reason is None]
    assert len(tokens) == 12 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == offline(served, "Once upon", 12)
    with_usage = list(served.client().completions.create(
        model=NAME, prompt="Once upon", max_tokens=3, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in with_usage[:-1])
    with served.http() as h:  # the raw wire format ends with [DONE]
        body = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}).text
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert len(events) == 2 + 1 + 1


def test_seeded_sampling_and_n_choices_equal_offline(served):
    params = SamplingParams(temperature=0.9, top_k=40, seed=1234)
    out = served.client().completions.create(model=NAME, prompt="The sea", max_tokens=15, n=3,
                                             temperature=0.9, seed=1234, extra_body={"top_k": 40})
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [offline(served, "The sea", 15, params, j) for j in range(3)]
    assert len(set(texts)) == 3, "the n choices are independent draws"
    assert out.usage.completion_tokens == 45 and out.usage.prompt_tokens == 7


def test_prompt_list_gives_prompt_major_choices(served):
    out = served.client().completions.create(model=NAME, prompt=["ab", "xyz"], max_tokens=5,
                                             n=2, temperature=0)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [offline(served, "ab", 5)] * 2 + [offline(served, "xyz", 5)] * 2
    assert out.usage.prompt_tokens == 5


def test_token_id_prompt_equals_string_prompt(served):
    with served.http() as h:
        a = h.post("/v1/completions", json={"prompt": list(b"Hi"), "max_tokens": 6,
                                            "temperature": 0, "echo": True}).json()
    assert a["choices"][0]["text"] == "Hi" + offline(served, "Hi", 6)


ASCII = SamplingParams(temperature=0.0, ascii_only=True)


def test_stop_string_finishes_with_stop(served):
    free = offline(served, "Hello", 30, ASCII)
    stop = free[6:8]
    out = served.client().completions.create(model=NAME, prompt="Hello", max_tokens=30,
                                             temperature=0, stop=[stop, "@@@"],
                                             extra_body={"ascii_only": True})
    (choice,) = out.choices
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert choice.text == offline(served, "Hello", 30, ASCII, stop=[stop, "@@@"])
    assert free.startswith(choice.text) and len(choice.text) < len(free)


def test_echo_and_logprobs_shape_and_values(served):
    out = served.client().completions.create(model=NAME, prompt="Hello", max_tokens=5,
                                             temperature=0, echo=True, logprobs=2,
                                             extra_body={"ascii_only": True})
    (choice,) = out.choices
    lp = choice.logprobs
    completion = offline(served, "Hello", 5, ASCII)
    assert choice.text == "Hello" + completion
    assert lp.tokens == list("Hello" + completion)
    assert lp.text_offset == list(range(10))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = list(("Hello" + completion).encode())
    logits, _ = served.model(np.asarray([ids]))
    ref = _log_softmax(logits.data[0])  # (T, V): row t predicts token t + 1
    want = [ref[t - 1, ids[t]] for t in range(1, 10)]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-9)
    for t in range(1, 10):
        top = lp.top_logprobs[t]
        best = np.argsort(-ref[t - 1], kind="stable")[:2]
        keys = [chr(b) if b < 0x80 else f"bytes:\\x{b:02x}" for b in best]  # OpenAI's spelling
        assert 2 <= len(top) <= 3
        assert all(abs(top[k] - ref[t - 1, b]) < 1e-9 for k, b in zip(keys, best))
        assert top[lp.tokens[t]] == pytest.approx(lp.token_logprobs[t], abs=1e-12)


def test_streamed_logprobs_come_with_each_token(served):
    stream = served.client().completions.create(model=NAME, prompt="Hey", max_tokens=4,
                                                temperature=0, logprobs=0, stream=True)
    per_token = [c.choices[0].logprobs for c in stream if c.choices[0].finish_reason is None]
    assert len(per_token) == 4
    assert all(len(p.tokens) == 1 and len(p.top_logprobs[0]) == 1 for p in per_token)
    assert [p.text_offset[0] for p in per_token] == [0, 1, 2, 3]


def test_prompt_truncation_only_when_asked(served):
    long_prompt = "z" * 300
    with served.http() as h:
        r = h.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
        _assert_openai_error(r, 400, param="prompt", code="context_length_exceeded")
        assert "300" in r.json()["error"]["message"] and "256" in r.json()["error"]["message"]
        ok = h.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4,
                                             "temperature": 0, "truncate": True, "echo": True}).json()
    assert ok["usage"]["prompt_tokens"] == 252
    assert ok["choices"][0]["text"] == "z" * 252 + offline(served, "z" * 252, 4)


def test_generation_reaching_the_context_ends_with_length(served):
    out = served.client().completions.create(model=NAME, prompt="q" * 250, max_tokens=20,
                                             temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.choices[0].text == offline(served, "q" * 250, 6)


def test_the_server_stops_at_the_context_where_numgpt_generate_slides(served):
    """The one documented difference: past the context, `numgpt generate` slides its window
    and goes on, the server ends the choice with "length". Up to the context both give the
    same tokens."""
    cmd = [sys.executable, "-m", "numgpt", "generate", "--model", str(served.prefix), "--prompt",
           "q" * 250, "-n", "20", "--temperature", "0", "--json"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    slid = json.loads(run.stdout.splitlines()[0])["generated_ids"]
    with served.http() as h:
        out = h.post("/v1/completions", json={"prompt": "q" * 250, "max_tokens": 20,
                                              "temperature": 0}).json()
    choice = out["choices"][0]
    assert len(slid) == 20 and out["usage"]["completion_tokens"] == 6
    assert choice["finish_reason"] == "length"
    assert list(choice["text"].encode()) == slid[:6]  # the same tokens up to the context


# ------------------------------------------------- scoring clients (lm-evaluation-harness)


def test_models_reports_the_context_as_max_model_len(served):
    with served.http() as h:
        (card,) = h.get("/v1/models").json()["data"]
    assert card["id"] == NAME and card["max_model_len"] == 256


def test_score_only_request_max_tokens_0_with_echo(served):
    """max_tokens 0 + echo + logprobs (what scoring clients send): the prompt's logprobs,
    nothing generated, and a prompt may fill the whole context."""
    ids = list(b"Hello there")
    with served.http() as h:
        out = h.post("/v1/completions", json={"prompt": [ids, ids[:4]], "max_tokens": 0,
                                              "echo": True, "logprobs": 1}).json()
        full = h.post("/v1/completions", json={"prompt": [65] * 256, "max_tokens": 0,
                                               "echo": True, "logprobs": 0})
        over = h.post("/v1/completions", json={"prompt": [65] * 256, "max_tokens": 1})
        bare = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert [c["text"] for c in out["choices"]] == ["Hello there", "Hell"]
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    assert out["usage"] == {"prompt_tokens": 15, "completion_tokens": 0, "total_tokens": 15}
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logits, _ = served.model(np.asarray([ids]))
    ref = _log_softmax(logits.data[0])  # (T, V): row t predicts token t + 1
    np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[t - 1, ids[t]] for t in range(1, 11)],
                               atol=1e-9)
    assert out["choices"][1]["logprobs"]["token_logprobs"][1:] == lp["token_logprobs"][1:4]
    assert full.status_code == 200 and len(full.json()["choices"][0]["logprobs"]["tokens"]) == 256
    _assert_openai_error(over, 400, param="prompt", code="context_length_exceeded")
    assert "max_length=256" in over.json()["error"]["message"]  # the flag lm-eval needs
    _assert_openai_error(bare, 400, param="max_tokens")  # 0 without echo asks for nothing


def test_remote_tokenizer_endpoints(served):
    tok = served.model.tokenizer
    with served.http() as h:
        info = h.get("/tokenizer_info").json()
        ids = h.post("/tokenize", json={"prompt": "Héllo", "add_special_tokens": False}).json()
        alias = h.post("/tokenize", json={"content": "Héllo"}).json()
        text = h.post("/detokenize", json={"tokens": tok.encode("Héllo")}).json()
        bad = [h.post("/tokenize", json={"prompt": 5}), h.post("/detokenize", json={"tokens": [300]}),
               h.post("/detokenize", json={"tokens": "x"}),
               h.post("/tokenize", content=b'{"prompt": "\\ud800"}',
                      headers={"Content-Type": "application/json"})]
    assert info["max_model_len"] == 256 and info["model_max_length"] == 256
    assert "eos_token" in info and info["eos_token"] is None  # the byte tokenizer has none
    assert ids["tokens"] == tok.encode("Héllo") and ids["count"] == 6 and ids["max_model_len"] == 256
    assert alias["tokens"] == ids["tokens"]
    assert text == {"prompt": "Héllo", "content": "Héllo"}
    for r, param in zip(bad, ["prompt", "tokens", "tokens", "prompt"]):
        _assert_openai_error(r, 400, param=param)
    no_key = httpx.post(served.url + "/tokenize", json={"prompt": "x"})
    _assert_openai_error(no_key, 401)  # the tokenizer routes need the key like the rest


def test_stream_options_include_usage_is_type_checked(served):
    with served.http() as h:
        r = h.post("/v1/completions", json={"prompt": "x", "stream": True,
                                            "stream_options": {"include_usage": "yes"}})
    _assert_openai_error(r, 400, param="stream_options.include_usage")


# -------------------------------------------------------------------- concurrency


def test_sixteen_concurrent_clients_batched_and_correct(served):
    client = served.client()
    barrier = threading.Barrier(16, timeout=30)
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        seeded = i % 2 == 1
        kwargs = dict(temperature=0.8, seed=100 + i) if seeded else dict(temperature=0)
        barrier.wait()
        if i % 4 == 0:  # a quarter stream
            chunks = list(client.completions.create(model=NAME, prompt=f"client {i}:",
                                                    max_tokens=24, stream=True, **kwargs))
            results[i] = ("".join(c.choices[0].text for c in chunks),
                          chunks[-1].choices[0].finish_reason)
        else:
            out = client.completions.create(model=NAME, prompt=f"client {i}:", max_tokens=24,
                                            **kwargs)
            results[i] = (out.choices[0].text, out.choices[0].finish_reason)

    before = served.metrics()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16, "some clients got no answer"
    for i in range(16):
        params = SamplingParams(0.8, seed=100 + i) if i % 2 else GREEDY
        assert results[i] == (offline(served, f"client {i}:", 24, params), "length"), i
    after = served.metrics()
    multi = (after["numgpt_decode_batch_size_count"] - after['numgpt_decode_batch_size_bucket{le="1"}']) \
        - (before["numgpt_decode_batch_size_count"] - before['numgpt_decode_batch_size_bucket{le="1"}'])
    assert multi > 0 and after["numgpt_decode_batch_size_max"] > 1, "no batched decode step"
    assert after["numgpt_tokens_generated_total"] - before["numgpt_tokens_generated_total"] >= 16 * 24


def test_client_killed_mid_stream_frees_its_slot(served):
    before = served.metrics().get('numgpt_sequences_finished_total{reason="cancelled"}', 0)
    with served.http() as h:
        with h.stream("POST", "/v1/completions", json={"prompt": "go", "max_tokens": LIMIT,
                                                       "stream": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            got = []
            for line in lines:
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 3:
                    break
    assert len(got) == 3  # the connection is closed here, mid-stream
    deadline = time.monotonic() + 15
    while True:
        m = served.metrics()
        freed = m["numgpt_active_slots"] == 0 and m["numgpt_queue_depth"] == 0
        cancelled = m.get('numgpt_sequences_finished_total{reason="cancelled"}', 0) > before
        if freed and cancelled:
            break
        assert time.monotonic() < deadline, f"slot not freed: {m}"
        time.sleep(0.05)
    out = served.client().completions.create(model=NAME, prompt="still", max_tokens=3, temperature=0)
    assert out.choices[0].text == offline(served, "still", 3)


def _wait_metrics(served, predicate, seconds=15.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        m = served.metrics()
        if predicate(m):
            return m
        assert time.monotonic() < deadline, f"metrics never got there: {m}"
        time.sleep(0.02)


def test_client_gone_before_a_plain_answer_frees_its_slot(served):
    """A non-streaming client that hangs up while its completion is generated."""
    cancelled = 'numgpt_sequences_finished_total{reason="cancelled"}'
    before = served.metrics().get(cancelled, 0)
    body = b'{"prompt": "slow", "max_tokens": 240, "n": 4}'
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        _wait_metrics(served, lambda m: m["numgpt_active_slots"] > 0, 10)
    m = _wait_metrics(served, lambda m: m["numgpt_active_slots"] == 0 and m.get(cancelled, 0) > before)
    assert m[cancelled] - before == 4  # all four choices stopped early
    assert m['numgpt_http_requests_total{path="/v1/completions",status="499"}'] >= 1


# -------------------------------------------------------------------- bad input


def _assert_openai_error(r: httpx.Response, status: int, param=None, code=None) -> None:
    """OpenAI's error shape, the expected status, and no traceback in the body."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


def test_error_checker_rejects_a_success_response(served):
    """Negative control for the error-shape checks below."""
    with served.http() as h:
        ok = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    with pytest.raises(AssertionError):
        _assert_openai_error(ok, 200)


BAD_BODIES = [
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["ok", ""]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [[1, 2], [999]]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": -5}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "n": 1.5}, 400, "n"),
    ({"prompt": "x", "stop": 3}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "model": 7}, 400, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES, ids=[str(b) for b, _, _ in BAD_BODIES])
def test_bad_fields_get_openai_errors(served, body, status, param):
    with served.http() as h:
        _assert_openai_error(h.post("/v1/completions", json=body), status, param=param)


def test_bad_bodies_get_openai_errors(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    js = {**auth, "Content-Type": "application/json"}
    with httpx.Client(base_url=served.url, timeout=30) as h:
        _assert_openai_error(h.post("/v1/completions", content=b'{"prompt": "x"', headers=js),
                             400, code="invalid_json")
        _assert_openai_error(h.post("/v1/completions", content=b"[1, 2]", headers=js), 400)
        _assert_openai_error(h.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=js),
                             400, code="invalid_encoding")
        _assert_openai_error(h.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                                    headers=js), 400, param="temperature")
        _assert_openai_error(h.post("/v1/completions", content=b"[" * 100000 + b"]" * 100000,
                                    headers=js), 413)
        _assert_openai_error(h.post("/v1/completions", content=b'{"prompt": "x"}',
                                    headers={**auth, "Content-Type": "text/plain"}), 415)
        _assert_openai_error(h.post("/v1/completions", content=b'{"prompt": "x"}', headers=auth), 415)
        _assert_openai_error(h.post("/v1/completions", content=b"[" * 5000 + b"]" * 5000,
                                    headers=js), 400)  # too deep for the JSON parser

        def chunks():  # no Content-Length: the cap must hold while reading
            for _ in range(5):
                yield b" " * (BODY_LIMIT // 4)

        _assert_openai_error(h.post("/v1/completions", content=chunks(), headers=js), 413)
        _assert_openai_error(h.get("/v1/nothing", headers=auth), 404)
        _assert_openai_error(h.get("/v1/completions", headers=auth), 405)


def test_any_model_name_gets_this_model_and_the_answer_names_it(served):
    """The README's snippets send "gpt2"; a server of one model answers whatever a request
    calls it (as llama-server does) and names its own model in the answer."""
    want = offline(served, "Hi", 3)
    for model in ("gpt2", "gpt-4", NAME):
        out = served.client().completions.create(model=model, prompt="Hi", max_tokens=3,
                                                 temperature=0)
        assert out.model == NAME and out.choices[0].text == want
    with served.http() as h:
        bare = h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        tokens = h.post("/tokenize", json={"prompt": "Hi", "model": "gpt2"})
    assert bare.json()["model"] == NAME and bare.json()["choices"][0]["text"] == want
    assert tokens.json()["tokens"] == [72, 105]


def test_chat_completions_answer_the_rendered_prompts_completion(served):
    """/v1/chat/completions is served (it answered a 404 before issue 23); its reply is the
    completion of the messages rendered with the default template (tests/test_chat_server.py
    has the rest)."""
    with served.http() as h:
        r = h.post("/v1/chat/completions", json={"model": "gpt2", "max_tokens": 8,
                                                 "temperature": 0, "messages": [
            {"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert r.json()["model"] == NAME
    out = served.client().chat.completions.create(model="gpt2", max_tokens=8, temperature=0,
                                                  messages=[{"role": "user", "content": "Hi"}])
    want = offline(served, "user: Hi\x04assistant: ", 8, stop="\x04")
    assert out.choices[0].message.content == r.json()["choices"][0]["message"]["content"] == want


def test_unknown_fields_are_ignored(served):
    with served.http() as h:
        r = h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                            "frobnicate": {"a": 1}, "user": "me", "presence_penalty": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(served, "Hi", 3)


def test_server_keeps_serving_after_bad_input(served):
    assert served.proc.poll() is None
    with served.http() as h:
        assert h.get("/health").status_code == 200
        counts = served.metrics()
    assert counts['numgpt_http_requests_total{path="/v1/completions",status="400"}'] >= 20
    out = served.client().completions.create(model=NAME, prompt="fine", max_tokens=4, temperature=0)
    assert out.choices[0].text == offline(served, "fine", 4)
    assert "Traceback" not in served.log.read_text()


# ------------------------------------------------------------- in-process (no network)


@pytest.fixture
def app_client():
    from starlette.testclient import TestClient

    from numgpt.serve import app as serve_app

    made = []

    def make(config=None, model=None):
        app = serve_app.create_app(config or serve_app.ServerConfig(model_name=NAME), model=model)
        # a loopback name: TestClient's own "testserver" is not an allowed Host
        client = TestClient(app, raise_server_exceptions=False, base_url="http://localhost")
        client.__enter__()
        made.append(client)
        return client, app.state.numgpt

    yield make
    for c in made:
        c.__exit__(None, None, None)


def _wait(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_health_is_503_until_the_model_is_loaded(app_client, monkeypatch, tmp_path):
    from numgpt.io import checkpoint
    from numgpt.serve import app as serve_app

    release = threading.Event()
    real = checkpoint.load

    def slow_load(path):
        assert release.wait(20)
        return real(path)

    prefix = save(_tiny_model(64), tmp_path / "m")
    monkeypatch.setattr(checkpoint, "load", slow_load)
    client, state = app_client(serve_app.ServerConfig(model_path=str(prefix)))
    r = client.get("/health")
    _assert_openai_error(r, 503, code="model_not_ready")
    assert "loading" in r.json()["error"]["message"] and "Retry-After" in r.headers
    _assert_openai_error(client.post("/v1/completions", json={"prompt": "x"}), 503)
    release.set()
    _wait(lambda: state.ready)
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == "m"


def test_a_model_that_fails_to_load_is_reported(app_client, tmp_path):
    from numgpt.serve import app as serve_app

    client, state = app_client(serve_app.ServerConfig(model_path=str(tmp_path / "missing")))
    _wait(lambda: state.load_error is not None)
    r = client.get("/health")
    _assert_openai_error(r, 503)
    assert "failed to load" in r.json()["error"]["message"]


def test_a_run_folders_checkpoint_is_named_after_the_run(app_client, tmp_path):
    """Without --model-name the model is named after its path, and a run's best/latest
    checkpoint (or a nanoGPT ckpt.pt, an HF weights file) after the folder, not "best"."""
    from numgpt.serve import app as serve_app

    names = {"runs/mine/best": "mine", "runs/mine/latest": "mine", "runs/mine/best.json": "mine",
             "out/ckpt.pt": "out", "gpt2/model.safetensors": "gpt2", "gpt2": "gpt2",
             "tiny.gguf": "tiny", "ckpts/gpt2-medium": "gpt2-medium", "m.q8_0": "m.q8_0"}
    assert {p: serve_app.default_model_name(p) for p in names} == names
    prefix = save(_tiny_model(64), tmp_path / "runs" / "mine" / "best")
    client, state = app_client(serve_app.ServerConfig(model_path=str(prefix)))
    _wait(lambda: state.ready)
    assert client.get("/v1/models").json()["data"][0]["id"] == "mine"
    out = client.post("/v1/completions", json={"model": "gpt2", "prompt": "x", "max_tokens": 1})
    assert out.status_code == 200 and out.json()["model"] == "mine"


def test_the_host_header_must_name_this_server(app_client):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    ``Host: evil.example``. Only IP addresses, loopback names and --allowed-hosts are
    answered, on every route (the page included), before the API key is looked at."""
    from numgpt.errors import ConfigError
    from numgpt.serve import app as serve_app

    client, _ = app_client(serve_app.ServerConfig(model_name=NAME, api_key=KEY,
                                                  allowed_hosts=("Models.Example.org",)),
                           model=_tiny_model(64))
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "10.1.2.3",
                 "models.example.org:443", "MODELS.example.org."):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for path in ("/health", "/v1/models", "/", "/static/playground.js"):
        r = client.get(path, headers={"Host": "evil.example:8000"})
        _assert_openai_error(r, 400, code="host_not_allowed")
        msg = r.json()["error"]["message"]
        assert "'evil.example'" in msg and "--allowed-hosts evil.example" in msg
    r = client.post("/v1/completions", json={"prompt": "x"}, headers={"Host": "evil.example"})
    _assert_openai_error(r, 400, code="host_not_allowed")  # before the key: no 401 to learn from
    anyone, _ = app_client(serve_app.ServerConfig(model_name=NAME, allowed_hosts=("*",)),
                           model=_tiny_model(64))
    assert anyone.get("/health", headers={"Host": "evil.example"}).status_code == 200
    # `numgpt serve --host NAME` answers that name too; an address needs no entry
    base = serve_app.ServerConfig(allowed_hosts=("a.example",))
    assert serve_app._answering(base, "Box.LAN").allowed_hosts == ("a.example", "box.lan")
    assert serve_app._answering(base, "0.0.0.0").allowed_hosts == ("a.example",)
    assert serve_app._answering(base, "::1").allowed_hosts == ("a.example",)
    for bad in ("http://x.org", "x.org:80", "", "a/b"):
        with pytest.raises(ConfigError, match="--allowed-hosts"):
            serve_app.ServerConfig(allowed_hosts=(bad,))


def _overflowing_model() -> GPT:
    """Finite weights whose forward pass overflows float32: ln_f's scale 3e38 (the finite
    weight check passes it; the logits come out inf - inf = NaN)."""
    m = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=5)
    m.tokenizer = ByteTokenizer()
    m.ln_f.weight.data[:] = 3e38
    return m


def test_non_finite_logits_are_one_clear_error_never_nan_or_a_traceback(app_client, caplog):
    client, _ = app_client(model=_overflowing_model())
    plain = {"prompt": "Hi", "max_tokens": 3}
    bodies = [plain, {**plain, "temperature": 0}, {**plain, "logprobs": 2},
              {"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 1}]
    with caplog.at_level("INFO"):
        for body in bodies:
            r = client.post("/v1/completions", json=body)
            _assert_openai_error(r, 500, code="non_finite_logits")
            assert "not finite" in r.json()["error"]["message"], body
        stream = client.post("/v1/completions", json={**plain, "stream": True, "logprobs": 1})
    assert stream.status_code == 200
    events = [e[len("data: "):] for e in stream.text.split("\n\n") if e]
    parsed = [json.loads(e, parse_constant=pytest.fail) for e in events]  # strict JSON only
    assert parsed[-1]["error"]["code"] == "non_finite_logits"
    assert "Traceback" not in caplog.text
    assert sum("not finite" in r.message for r in caplog.records) == len(bodies) + 1
    # control: the same weights without the overflow answer normally
    healthy, _ = app_client(model=_tiny_model(64))
    assert healthy.post("/v1/completions", json={**plain, "logprobs": 2}).status_code == 200


def test_unexpected_errors_become_a_generic_500(app_client, monkeypatch):
    from numgpt.serve import app as serve_app

    def boom(*a, **kw):
        raise ZeroDivisionError("secret internals")

    client, _ = app_client(model=_tiny_model(64))
    monkeypatch.setattr(serve_app, "parse_completion", boom)
    r = client.post("/v1/completions", json={"prompt": "x"})
    _assert_openai_error(r, 500, code="internal_error")
    assert "secret" not in r.text and "ZeroDivision" not in r.text
    monkeypatch.undo()
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_full_queue_answers_503_with_retry_after(app_client):
    from numgpt.serve import engine
    from numgpt.serve import app as serve_app

    client, state = app_client(serve_app.ServerConfig(model_name=NAME, max_batch=1, max_queue=2),
                               model=_tiny_model(64))
    state.engine.stop()  # park the worker so queued sequences stay queued
    state.engine.submit([engine.Request([1, 2], 3, GREEDY, lambda ev: None)])
    r = client.post("/v1/completions", json={"prompt": "x", "n": 2})
    _assert_openai_error(r, 503, code="overloaded")
    assert r.headers["Retry-After"].isdigit()
    _assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "n": 3}), 400, param="n")


def test_gpt2_tokenizer_end_of_text_and_byte_tokens(app_client, gpt2_tokenizer_dir, tmp_path):
    """With GPT-2's BPE: end-of-text ends a choice with "stop", and tokens that are not
    whole UTF-8 show as ``bytes:\\xNN`` in logprobs, as OpenAI shows them."""
    from numgpt.serve import protocol
    from numgpt.io.tokenizer import GPT2Tokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, tmp_path / name)
    tok = GPT2Tokenizer.from_folder(tmp_path)
    m = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16,
                      dtype="float64"), seed=0)
    m.tokenizer = tok
    # make end-of-text the greedy pick after position 5 (the 5th new token): the longest
    # embedding row wins when the final hidden state points along it
    eot_row = m.wte.weight.data[tok.eot_id]
    eot_row *= 3.0
    m.wpe.weight.data[5] = 100.0 * eot_row / np.linalg.norm(eot_row)
    client, _ = app_client(model=m)
    body = client.post("/v1/completions", json={"prompt": "Hello.", "max_tokens": 30,
                                                "temperature": 0, "logprobs": 1}).json()
    choice = body["choices"][0]
    ref = generate(m, tok.encode("Hello."), 30, GREEDY)
    assert choice["text"] == tok.decode(ref)
    assert len(ref) == 4 and choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5  # the end-of-text token counts, unseen
    assert choice["logprobs"]["tokens"] == [protocol.token_str(tok, t) for t in ref]
    assert protocol.token_str(tok, tok.encode(" the")[0]) == " the"
    partial = next(t for t in range(256) if tok.token_bytes(t)[0] >= 0x80)
    assert protocol.token_str(tok, partial) == f"bytes:\\x{tok.token_bytes(partial)[0]:02x}"
    assert body["usage"]["prompt_tokens"] == 2


# ---------------------------------------------------------------------------- metrics


def test_metric_misuse_raises_numgpt_errors_not_bare_key_errors():
    from numgpt.errors import ConfigError, InputError, NumGPTError
    from numgpt.serve.metrics import Counter, Histogram, Registry

    reg = Registry()
    c = reg.add(Counter("requests_total", "Requests.", ["path", "status"]))
    c.inc(path="/health", status="200")  # control: the right labels count
    assert c.value(path="/health", status="200") == 1.0
    for labels in ({"path": "/health"}, {"path": "/x", "status": "200", "extra": "1"}):
        with pytest.raises(InputError, match=r"takes the labels \['path', 'status'\]"):
            c.inc(**labels)
    with pytest.raises(InputError, match="requests_total"):
        c.value(status="200")
    h = reg.add(Histogram("step_seconds", "Step time.", [0.1, 1.0]))
    h.observe(0.5)
    with pytest.raises(InputError, match="NaN"):
        h.observe(float("nan"))
    assert h.count() == 1  # the rejected observation left no trace
    with pytest.raises(ConfigError, match="'requests_total' is already registered"):
        reg.add(Counter("requests_total", "Again."))
    for err in (InputError, ConfigError):
        assert issubclass(err, NumGPTError) and not issubclass(err, KeyError)
    assert reg.render().count("# TYPE requests_total counter") == 1
