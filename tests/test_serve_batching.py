"""``numgpt serve``'s packed steps seen from outside (issue 18): the --prefill-chunk and
--prefix-cache-mb flags, the start line naming the matmul, and /metrics read back as text.

The engine's own behaviour (chunk sizes, reuse exactness, the pool's bound) is proven in
tests/test_engine.py without HTTP; here the real server in a subprocess shows the flags
reach it and its metrics say what happened. Reference: offline ``generate`` (float64).
"""

from __future__ import annotations

import httpx
import pytest

from numgpt.core.model import GPT, GPTConfig
from numgpt.errors import ConfigError
from numgpt.infer.sample import SamplingParams, generate
from numgpt.io.checkpoint import save
from numgpt.io.tokenizer import ByteTokenizer
from numgpt.serve.app import ServerConfig
from servers import serve_subprocess

SHARED = "Question: which of these is the shared context of every choice? Answer:"  # 71 bytes


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching")
    m = GPT(GPTConfig(vocab_size=256, block_size=256, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=5)
    m.tokenizer = ByteTokenizer()
    prefix = save(m, folder / "tiny")
    log = folder / "server.log"
    with serve_subprocess(prefix, log, "--max-batch", "2", "--prefill-chunk", "16",
                          "--prefix-cache-mb", "1", "--log-level", "info") as (url, _):
        yield url, m, log


def _complete(url: str, prompt: str, n: int = 6) -> str:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_prefix_reuse_and_latencies_show_in_metrics(server):
    url, model, _ = server
    before = _metrics(url)
    for choice in (" Paris", " Rome", " Oslo"):
        got = _complete(url, SHARED + choice)
        want = generate(model, list((SHARED + choice).encode()), 6, SamplingParams(0.0))
        assert got == bytes(want).decode("utf-8", "replace")
    after = _metrics(url)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)
    assert grew('numgpt_prefix_cache_hits_total{source="slot"}') == 2, "choices 2 and 3 reuse 1's slot"
    assert grew("numgpt_prompt_tokens_reused_total") == 2 * (len(SHARED) + 1)  # and the space
    assert grew("numgpt_time_to_first_token_seconds_count") == 3
    assert grew("numgpt_inter_token_latency_seconds_count") == 3 * 5
    # computed: the first prompt's 77 tokens, then 4 of each later one (72 shared, and the
    # last prompt token is always computed)
    assert grew("numgpt_step_prefill_tokens_sum") == len(SHARED + " Paris") + 2 * 4
    assert after["numgpt_prefix_cache_bytes"] >= 0 and "numgpt_prefix_cache_entries" in after


def test_the_server_names_its_matmul_at_start(server):
    *_, log = server
    lines = [x for x in log.read_text().splitlines() if "matmul:" in x]
    assert lines, "no line names the library that multiplies the step's rows"


def test_bad_batching_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="--prefill-chunk must be >= 1"):
        ServerConfig(prefill_chunk=0)
    with pytest.raises(ConfigError, match="--prefix-cache-mb must be >= 0"):
        ServerConfig(prefix_cache_mb=-1.0)
    assert ServerConfig(prefix_cache_mb=0).prefix_cache_mb == 0  # 0: the pool is off


def test_the_cli_defaults_are_the_engines():
    from numgpt.cli import build_parser
    from numgpt.serve.engine import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.prefill_chunk, args.prefix_cache_mb) == (DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB)
    assert (ServerConfig().prefill_chunk, ServerConfig().prefix_cache_mb) == \
        (DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB)


def test_the_start_line_names_the_q8_0_path_only_for_quantized_weights():
    from numgpt.core.quant import quantize_model
    from numgpt.serve.engine import matmul_line

    m = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32), seed=0)
    assert matmul_line(m).startswith("matmul: ") and "q8_0" not in matmul_line(m)
    assert "q8_0" in matmul_line(quantize_model(m))
