"""The playground page (``GET /`` on ``numgpt serve``) in a real browser.

Debian's Chromium driven by Selenium through the system chromedriver (the driver path is
given explicitly, so Selenium Manager never downloads anything), against the real server in
a subprocess with a small random-weight model. Every number the page shows is checked
against an independent source: the generated text and the alternatives' probabilities
against the API's own answer to the same request, the attention heatmap and the residual
norms against a ``numgpt trace`` recording of the same prompt (its checkpoint 4 and 7), the
slot a Stop frees against the server's /metrics. The tests also write the README's
screenshots (desktop and 375 px phone width) to docs/results/.

One server and one browser for the module; each test opens the page afresh. Without
Chromium and chromedriver on PATH the browser tests skip with the reason (``.ci/run``
installs them); the in-process tests of ``/v1/internals`` and the page's routes run anyway.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from numgpt.core.model import GPT, GPTConfig
from numgpt.io.checkpoint import save
from numgpt.io.tokenizer import ByteTokenizer, load_tokenizer
from servers import REPO, serve_subprocess

KEY = "playground-key-0123"
NAME = "tiny-playground"
PROMPT = "The meaning of life is"
INSIDE_PROMPT = "The cat sat on the mat because it was tired."
import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir()  # docs/results/ under --write-results
DESKTOP = (1280, 860)
PHONE = (375, 812)
MAX_PNG_BYTES = 300_000


def _browser_paths() -> tuple[str, str]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install -y "
                    "chromium chromium-driver; .ci/run installs them when it runs as root)")
    return chromium, driver


def _model(tokenizer) -> GPT:
    """Random weights in float64 (batched and single-row decoding cannot flip an argmax),
    with the final LayerNorm gain and the block weights scaled up so that
    probabilities and attention spread over orders of magnitude instead of sitting near
    uniform: the screenshots show something; no assertion depends on it."""
    m = GPT(GPTConfig(vocab_size=max(256, tokenizer.vocab_size), block_size=1024, n_layer=2,
                      n_head=2, n_embd=32, dtype="float64"), seed=5)
    m.ln_f.weight.data *= 30.0
    for block in m.h:
        for linear in (block.attn.c_attn, block.mlp.c_fc, block.mlp.c_proj):
            linear.weight.data *= 6.0
    m.tokenizer = tokenizer
    return m


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    try:  # real GPT-2 tokens read better on the page; bytes where the files are absent
        tokenizer = load_tokenizer(request.getfixturevalue("gpt2_tokenizer_dir"))
    except pytest.skip.Exception:
        tokenizer = ByteTokenizer()
    folder = tmp_path_factory.mktemp("playground")
    prefix = save(_model(tokenizer), folder / "tiny")
    with serve_subprocess(prefix, folder / "server.log", "--model-name", NAME, "--max-batch", "4",
                          "--log-level", "warning", api_key=KEY) as (url, _):
        yield {"url": url, "prefix": prefix, "tmp": folder}


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--force-color-profile=srgb", "--hide-scrollbars", "--lang=en-US",
                f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The playground in the browser, with the few moves the tests make."""

    def __init__(self, driver, url: str):
        self.driver, self.url = driver, url

    def viewport(self, width: int, height: int) -> None:
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})

    def open(self, key: str | None = KEY) -> "Page":
        self.driver.get(self.url + "/")
        self.wait(lambda: self.js("return document.body.dataset.ready === '1'"))
        if key is not None:
            self.use_key(key)
            self.wait(lambda: NAME in self.text("model-line"), what="the model name")
        return self

    def use_key(self, key: str) -> None:
        self.set("api-key", key)
        self.el("key-save").click()

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def el(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.js("return document.getElementById(arguments[0]).textContent", element_id)

    def set(self, element_id: str, value) -> None:
        self.js("document.getElementById(arguments[0]).value = arguments[1]", element_id, str(value))

    def wait(self, predicate, timeout: float = 30, what: str = "the page"):
        deadline = time.monotonic() + timeout
        while True:
            got = predicate()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; error box: "
                                     f"{self.text('error')!r}; status: {self.text('gen-status')!r}")
            time.sleep(0.05)

    def error(self) -> str:
        return self.text("error") if self.js("return !document.getElementById('error').hidden") else ""

    def params(self, **fields) -> None:
        """Fill the generate form: max_tokens=..., temperature=..., seed=..., stop=..."""
        for name, value in fields.items():
            self.set(name.replace("_", "-"), "" if value is None else value)

    def runs(self) -> int:
        return int(self.js("return Number(document.body.dataset.generated || 0)"))

    def generate(self, keyboard: bool = False) -> None:
        """Generate (button or Ctrl+Enter) and wait until the stream has ended."""
        from selenium.webdriver.common.keys import Keys

        before = self.runs()
        if keyboard:
            self.el("prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            self.el("generate").click()
        self.wait(lambda: self.runs() > before, what="the generation to end")

    def request(self) -> dict:
        """The body the page sends for the current form (the page's own function)."""
        return self.js("return completionRequest()")

    def generated(self) -> str:
        return self.js("return [...document.querySelectorAll('.choice .tok')]"
                       ".map(t => t.textContent).join('')")

    def token(self, i: int):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, ".tok[data-step]")[i]

    def tooltip(self) -> list[tuple[str, float, str]]:
        """(token, probability, the percentage shown) per row of the visible tooltip."""
        rows = self.js("""
            const tip = document.getElementById('tip');
            if (tip.hidden) return null;
            return [...tip.querySelectorAll('li')].map(li => [li.dataset.token, li.dataset.p,
                                                              li.querySelector('.alt-p').textContent]);""")
        return None if rows is None else [(t, float(p), shown) for t, p, shown in rows]

    def console_errors(self) -> list[dict]:
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, name: str) -> Path:
        path = RESULTS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        png = self.driver.get_screenshot_as_png()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < MAX_PNG_BYTES, (name, len(png))
        path.write_bytes(png)
        return path


@pytest.fixture
def page(browser, server) -> Page:
    p = Page(browser, server["url"])
    p.viewport(*DESKTOP)
    browser.get_log("browser")  # start each test with an empty console
    return p


def api(server, body: dict) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def metrics(server) -> dict[str, float]:
    text = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def shown_percent(text: str) -> float:
    """A probability as the page writes it: '43.2%' -> 43.2."""
    assert text.endswith("%"), text
    return float(text[:-1])


# ------------------------------------------------ the internals, without a browser


def _byte_model() -> GPT:
    m = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=2, n_embd=32,
                      dtype="float64"), seed=2)
    m.tokenizer = ByteTokenizer()
    return m


def test_internals_equal_the_trace_recording():
    from numgpt.serve import internals
    from numgpt.verify import trace

    model, ids = _byte_model(), list(b"Hello, attention!")
    recorded = trace.record(model, ids, 1)
    seen = internals.inspect(model, ids, layer=0)
    assert np.array_equal(seen.attention, recorded["step0/04_probs"][0])  # (nh, T, T)
    block0 = np.linalg.norm(recorded["step0/07_block_out"][0], axis=-1)  # (T,)
    embeddings = model.embed(np.array([ids]), np.arange(len(ids))).data[0]  # (T, C)
    assert seen.residual_norms.shape == (4, len(ids))
    assert np.array_equal(seen.residual_norms[1], block0)
    assert np.allclose(seen.residual_norms[0], np.linalg.norm(embeddings, axis=-1), rtol=1e-12)
    # negative: another layer's attention is not layer 0's, so the equality above means something
    deeper = internals.inspect(model, ids, layer=2).attention
    assert not np.allclose(deeper, seen.attention, atol=1e-4)
    assert np.allclose(deeper.sum(-1), 1) and np.all(np.triu(deeper, 1) == 0)


def test_internals_endpoint_limits_and_public_page():
    from starlette.testclient import TestClient

    from numgpt.serve.app import ServerConfig, create_app

    with TestClient(create_app(ServerConfig(model_name=NAME, api_key=KEY), model=_byte_model()),
                    raise_server_exceptions=False, base_url="http://localhost") as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        page = client.get("/")
        assert page.status_code == 200 and 'data-api-key="required"' in page.text
        # the page and every file it loads: own files only, never framed by another site
        for r in [page] + [client.get(f"/static/{f}") for f in
                           ("index.html", "playground.js", "playground.css", "favicon.svg")]:
            assert r.status_code == 200, r.url
            assert r.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
            assert r.headers["x-frame-options"] == "DENY", r.url
            assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert client.post("/v1/internals", json={"prompt": "x"}).status_code == 401
        ok = client.post("/v1/internals", json={"prompt": "y" * 64, "layer": 2}, headers=auth)
        assert ok.status_code == 200
        body = ok.json()
        assert (body["n_layer"], body["n_head"], body["layer"]) == (3, 2, 2)
        assert np.array(body["attention"]).shape == (2, 64, 64)
        assert np.array(body["residual_norms"]).shape == (4, 64) and body["tokens"] == ["y"] * 64
        for request, code in (({"prompt": "y" * 65}, "prompt_too_long"),
                              ({"prompt": "y", "layer": 3}, "invalid_value"),
                              ({"prompt": ["a", "b"]}, "invalid_prompt"),
                              ({"prompt": "y", "model": 7}, "invalid_type")):
            r = client.post("/v1/internals", json=request, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        other = client.post("/v1/internals", json={"prompt": "y", "model": "other"}, headers=auth)
        assert other.status_code == 200 and other.json()["model"] == NAME  # any name: this model
    with TestClient(create_app(ServerConfig(model_name=NAME), model=_byte_model()),
                    base_url="http://localhost") as client:
        assert 'data-api-key="none"' in client.get("/").text


# ----------------------------------------------------------------------- in the browser


def test_page_loads_clean_and_the_api_key_stays_in_the_tab(page, server):
    page.open(key=None)
    assert page.console_errors() == []
    assert "needs an API key" in page.error()
    assert page.js("return document.activeElement.id") == "api-key"

    page.use_key("wrong-key")
    page.wait(lambda: "HTTP 401" in page.error(), what="the 401 message")
    assert "missing or wrong API key" in page.error()

    page.use_key(KEY)
    page.wait(lambda: NAME in page.text("model-line"), what="the model name")
    assert page.error() == ""
    assert page.js("return sessionStorage.getItem('numgpt.apiKey')") == KEY
    assert page.js("return localStorage.length") == 0
    page.driver.refresh()  # same tab: the key is still there, nothing to type
    page.wait(lambda: NAME in page.text("model-line"), what="the model name after a reload")

    # the page's files are public and hold nothing secret; every API route needs the key
    for path in ("/", "/static/playground.js", "/static/playground.css", "/static/favicon.svg"):
        r = httpx.get(server["url"] + path)
        assert r.status_code == 200 and KEY not in r.text, path
    assert httpx.get(server["url"] + "/v1/models").status_code == 401
    assert httpx.post(server["url"] + "/v1/internals", json={"prompt": "x"}).status_code == 401


def test_greedy_generation_shows_exactly_the_api_text(page, server):
    page.open()
    page.params(max_tokens=24, temperature=0, seed=None, n=1, stop="")
    page.generate(keyboard=True)  # Ctrl+Enter
    body = {**page.request(), "stream": False}
    assert body["temperature"] == 0 and body["logprobs"] == 5 and body["model"] == NAME
    answer = api(server, body).json()["choices"][0]
    assert page.generated() == answer["text"] != ""
    assert "finish reason: length" in page.text("gen-status")
    # every token carries its probability, the number the shading and the label come from
    shown = page.js("return [...document.querySelectorAll('.tok[data-step]')]"
                    ".map(t => [t.dataset.p, t.getAttribute('aria-label')])")
    lps = answer["logprobs"]["token_logprobs"]
    assert len(shown) == len(lps) == 24
    for (p, label), lp in zip(shown, lps):
        assert math.isclose(float(p), math.exp(lp), rel_tol=1e-12)
        assert "probability" in label and label.endswith("%")
    assert page.console_errors() == []
    page.params(stop="\\n\nthe end")  # one stop string per line; \n typed means a newline
    assert page.request()["stop"] == ["\n", "the end"]


def test_hover_focus_and_click_show_the_api_alternatives(page, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.open()
    page.params(max_tokens=12, temperature=0, seed=None, n=1, stop="")
    page.generate()
    answer = api(server, {**page.request(), "stream": False}).json()["choices"][0]
    top = answer["logprobs"]["top_logprobs"]

    def expect(i: int) -> None:
        rows = page.wait(page.tooltip, what=f"the tooltip of token {i}")
        api_rows = sorted(top[i].items(), key=lambda kv: -kv[1])
        assert len(rows) == 5 and [t for t, _, _ in rows] == [t for t, _ in api_rows]
        for (_, p, text), (_, lp) in zip(rows, api_rows):
            assert math.isclose(p, math.exp(lp), rel_tol=1e-12)
            assert math.isclose(shown_percent(text), 100 * p, rel_tol=5e-3), text  # says the number

    ActionChains(page.driver).move_to_element(page.token(3)).perform()  # hover
    expect(3)
    page.js("arguments[0].focus()", page.token(0))  # keyboard: focus, then arrow keys
    expect(0)
    page.driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    page.wait(lambda: page.js("return document.activeElement.dataset.step") == "1")
    expect(1)
    page.driver.switch_to.active_element.send_keys(Keys.ENTER)  # the step's distribution
    bars = page.wait(lambda: page.js("""
        if (document.getElementById('dist').hidden) return null;
        return [...document.querySelectorAll('#dist-bars li')].map(li => Number(li.dataset.value));"""))
    probs = sorted(math.exp(lp) for lp in top[1].values())[::-1]
    assert np.allclose(bars[:5], probs, rtol=1e-12) and math.isclose(bars[5], 1 - sum(probs))


def test_stop_aborts_the_stream_and_frees_the_slot(page, server):
    from selenium.webdriver.common.keys import Keys

    cancelled = 'numgpt_sequences_finished_total{reason="cancelled"}'
    before = metrics(server).get(cancelled, 0)
    page.open()
    page.params(max_tokens=1000, temperature=1, seed=3, n=1, stop="")
    runs = page.runs()
    page.el("generate").click()
    page.wait(lambda: page.js("return document.querySelectorAll('.tok[data-step]').length >= 3"))
    page.el("prompt").send_keys(Keys.ESCAPE)
    page.wait(lambda: page.runs() > runs, what="the stream to stop")
    assert page.text("gen-status").startswith("Stopped")
    assert page.js("return document.getElementById('generate').disabled") is False
    deadline = time.monotonic() + 20
    while True:
        m = metrics(server)
        if m["numgpt_active_slots"] == 0 and m.get(cancelled, 0) == before + 1:
            break
        assert time.monotonic() < deadline, f"slot not freed: {m}"
        time.sleep(0.05)
    shown = page.js("return document.querySelectorAll('.tok[data-step]').length")
    assert 3 <= shown < 1000


def _trace(server, prompt: str) -> dict[str, np.ndarray]:
    """``numgpt trace`` of the prompt, through the command line, as a user runs it."""
    out = server["tmp"] / "inside.npz"
    run = subprocess.run([sys.executable, "-m", "numgpt", "trace", "--model", str(server["prefix"]),
                          "--prompt", prompt, "-n", "1", "--dtype", "float64", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _heatmap(page) -> dict:
    return page.js("""
        const t = document.getElementById('heatmap');
        if (!t.dataset.probs) return null;
        return {layer: Number(t.dataset.layer), head: Number(t.dataset.head),
                probs: JSON.parse(t.dataset.probs),
                rows: [...t.querySelectorAll('th.query')].map(th => th.textContent),
                cols: [...t.querySelectorAll('th.key')].map(th => th.textContent),
                cells: t.querySelectorAll('td').length,
                norms: JSON.parse(document.getElementById('norms').dataset.norms)};""")


def test_attention_heatmap_and_norms_equal_numgpt_trace(page, server):
    from selenium.webdriver.support.ui import Select

    recorded = _trace(server, INSIDE_PROMPT)
    probs = recorded["step0/04_probs"][0]  # (nh, T, T), layer 0
    T = probs.shape[-1]
    page.open()
    page.set("in-prompt", INSIDE_PROMPT)
    page.el("inspect").click()
    shown = page.wait(lambda: _heatmap(page), what="the heatmap")
    assert (shown["layer"], shown["head"]) == (0, 0)
    # float64 end to end, the same code in two processes: equal to float64 rounding (the
    # two processes may pick different BLAS blockings; in one process it is exact, above)
    assert np.allclose(np.array(shown["probs"]), probs[0], rtol=0, atol=1e-12)
    assert len(shown["rows"]) == len(shown["cols"]) == T and shown["cells"] == T * T
    labels = page.js("return state.internals.tokens")  # the prompt's tokens, in order
    assert "".join(labels) == INSIDE_PROMPT and len(labels) == T
    # residual norms: row 1 is block 0's output, trace checkpoint 7
    block0 = np.linalg.norm(recorded["step0/07_block_out"][0], axis=-1)  # (T,)
    norms = np.array(shown["norms"])  # (L + 1, T)
    assert norms.shape == (3, T) and np.allclose(norms[1], block0, rtol=1e-12)
    assert page.js("return document.querySelectorAll('#norms li').length") == 3

    Select(page.el("head")).select_by_value("1")  # another head: drawn from the same answer
    page.wait(lambda: _heatmap(page)["head"] == 1)
    assert np.allclose(np.array(_heatmap(page)["probs"]), probs[1], rtol=0, atol=1e-12)
    Select(page.el("layer")).select_by_value("1")  # another layer: asked for again
    page.wait(lambda: _heatmap(page)["layer"] == 1, what="layer 1")
    later = np.array(_heatmap(page)["probs"])
    assert later.shape == (T, T) and np.allclose(later.sum(-1), 1) and np.all(np.triu(later, 1) == 0)

    page.set("in-prompt", "word " * 70)  # 70+ tokens: refused by the server, said in words
    page.el("inspect").click()
    page.wait(page.error, what="the refusal")
    assert "HTTP 400" in page.error() and "at most 64" in page.error()


def test_a_bad_request_shows_the_servers_message(page, server):
    page.open()
    page.params(temperature=-1, max_tokens=8, seed=None, stop="")
    message = api(server, {**page.request(), "stream": False}).json()["error"]["message"]
    assert "temperature" in message
    page.generate()
    assert "HTTP 400" in page.error() and message in page.error()
    assert page.text("gen-status") == "Failed."


def test_a_busy_server_is_said_in_words(page, server):
    """A 503 (queue full, model loading) as the server sends it, from a stubbed fetch: the
    page says what it means and when to retry."""
    page.open()
    page.js("""
        window.fetch = async () => new Response(JSON.stringify({error: {
            message: "the server is busy: 64 sequences wait", type: "server_error",
            param: null, code: "overloaded"}}),
          {status: 503, headers: {"Content-Type": "application/json", "Retry-After": "2"}});""")
    page.generate()
    assert page.error() == ("The server cannot take this now (HTTP 503): the server is busy: "
                            "64 sequences wait (retry after 2 s)")


def test_copy_as_python_and_curl_reproduce_the_page(page, server):
    page.open()
    page.params(max_tokens=10, temperature=0.7, top_k=20, seed=11, n=2, stop="")
    page.generate()
    texts = page.js("return [...document.querySelectorAll('.choice')].map(c => "
                    "[...c.querySelectorAll('.tok')].map(t => t.textContent).join(''))")
    assert len(texts) == 2
    env = {**os.environ, "NUMGPT_API_KEY": KEY}

    page.el("copy-python").click()
    code = page.wait(lambda: page.js("const s = document.getElementById('snippet');"
                                     "return s.dataset.kind === 'Python code' && s.textContent"))
    assert KEY not in code
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "".join(t + "\n" for t in texts)

    page.el("copy-curl").click()
    command = page.wait(lambda: page.js("const s = document.getElementById('snippet');"
                                        "return s.dataset.kind === 'curl command' && s.textContent"))
    assert KEY not in command and "$NUMGPT_API_KEY" in command
    if shutil.which("curl") is None:
        return  # the Python check above already proved the request; curl is optional here
    run = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    streamed = ["", ""]
    for line in run.stdout.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                streamed[c["index"]] += c["text"]
    assert streamed == texts


def _show_generation(page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    page.open()
    page.params(max_tokens=40, temperature=0.9, top_k=40, seed=7, n=1, stop="")
    page.generate()
    page.token(9).click()  # the bar chart of step 10
    if page.js("return window.innerWidth") < 600:  # a phone: the text sits below the form
        page.js("document.getElementById('outputs').scrollIntoView({block: 'start'})")
    ActionChains(page.driver).move_to_element(page.token(6)).perform()
    page.wait(page.tooltip, what="the tooltip")


def _show_inside(page) -> None:
    page.set("in-prompt", INSIDE_PROMPT)
    page.el("inspect").click()
    page.wait(lambda: _heatmap(page), what="the heatmap")
    page.js("document.getElementById('in-title').scrollIntoView({block: 'start'})")


def test_screenshots_desktop_and_phone(page, server):
    for name, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.viewport(*size)
        _show_generation(page)
        # nothing wider than the screen: the page scrolls only vertically (the heatmap
        # scrolls inside its own box)
        assert page.js("return document.documentElement.scrollWidth") <= size[0]
        page.screenshot(f"playground_generate_{name}.png")
        _show_inside(page)
        assert page.js("return document.documentElement.scrollWidth") <= size[0]
        page.screenshot(f"playground_inside_{name}.png")
    assert page.console_errors() == []
