"""The inspect tools (numgpt/inspect/) against the same analyses done with TransformerLens's
own hooks and helpers on the same random-weight GPT-2 folder (tests/tl_oracle.py):

* logit lens vs ``cache.accumulated_resid(apply_ln=True)`` (final norm recomputed) @ ``W_U``;
* patching vs ``patching.get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_all_pos``;
* ablation vs the bridge's ``run_with_hooks(..., return_type="loss")`` with the same edits;
* attribution vs ``cache.stack_head_results(apply_ln=True)`` / ``decompose_resid`` (frozen
  final scale) times ln_final's gain, dotted with ``tokens_to_residual_directions``.

Each family has a negative control (a position off by one, two heads swapped) that fails
the same comparison. Rows go to docs/results/inspect_parity.md. float64 throughout, so the
gate can be tight (1e-8) and a wrong index cannot hide in round-off.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import results_table
from tl_oracle import SMALL, boot, hf_folder, max_diff, to_numpy, torch

import numgpt
from numgpt.errors import InputError
from numgpt.inspect import ablate, attribute, logit_lens, patch

TOL = 1e-8
CLEAN = [464, 3290, 373, 257, 1310, 13, 383, 3290]
CORRUPT = [464, 3797, 373, 257, 1310, 13, 383, 3797]  # two tokens changed, same length
ANSWER, WRONG = 3290, 3797
REFERENCE = np.array([[15496, 13, 314, 1101, 257], [40, 588, 262, 3290, 13]])


def _row(case: str, diff: float, ok: bool, gate: str = f"<= {TOL:g}") -> None:
    results_table.record("inspect_parity.md", case, f"{diff:.3g}", gate, "PASS" if ok else "FAIL")


def _gate(case: str, ours: np.ndarray, theirs: np.ndarray, tol: float = TOL) -> None:
    d = max_diff(ours, theirs)
    _row(case, d, d <= tol, f"<= {tol:g}")
    assert d <= tol, f"{case}: {d}"


def _control(case: str, ours: np.ndarray, theirs: np.ndarray, tol: float = TOL) -> None:
    """Negative control: a deliberately wrong index must FAIL the gate."""
    d = max_diff(ours, theirs)
    _row(f"negative control: {case}", d, d > tol, f"must exceed {tol:g}")
    assert d > tol, f"{case} was not caught ({d})"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = hf_folder(tmp_path_factory.mktemp("inspect"), SMALL, seed=2)
    return numgpt.load(folder, dtype="float64"), boot(folder, "float64")


def _tokens(ids) -> "torch.Tensor":
    return torch.tensor(np.atleast_2d(ids))


def test_logit_lens_equals_transformer_lens(pair):
    model, bridge = pair
    lens = logit_lens(model, CLEAN, target=ANSWER, k=5)
    _, cache = bridge.run_with_cache(_tokens(CLEAN))
    stack = to_numpy(cache.accumulated_resid(apply_ln=True))[:, 0]  # (L + 1, T, C)
    logits = stack @ to_numpy(bridge.W_U)  # (L + 1, T, V)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    _gate("logit lens, target probability per (layer, position)", lens.target_probs, probs[..., ANSWER])
    top = np.take_along_axis(probs, lens.top_ids, axis=-1)
    _gate("logit lens, top-5 probabilities per (layer, position)", lens.top_probs, top)
    assert np.array_equal(lens.top_ids[..., 0], probs.argmax(-1))
    final = model.run_with_hooks(CLEAN)[0]  # the last row is the model's own prediction
    assert np.array_equal(lens.top_ids[-1, :, 0], final.argmax(-1))
    _control("logit lens, layer rows off by one", lens.target_probs[1:], probs[:-1, :, ANSWER])


def _tl_metric(bridge, clean_ld, corrupt_ld):
    def metric(logits):
        ld = logits[0, -1, ANSWER] - logits[0, -1, WRONG]
        return (ld - corrupt_ld) / (clean_ld - corrupt_ld)
    return metric


def test_patching_equals_transformer_lens(pair):
    from transformer_lens import patching as tl_patching

    model, bridge = pair
    ours = patch(model, CLEAN, CORRUPT, ANSWER, WRONG)
    clean_logits, clean_cache = bridge.run_with_cache(_tokens(CLEAN))
    corrupt_logits = bridge(_tokens(CORRUPT))
    ld = lambda lg: float((lg[0, -1, ANSWER] - lg[0, -1, WRONG]).detach())  # noqa: E731
    metric = _tl_metric(bridge, ld(clean_logits), ld(corrupt_logits))
    assert abs(ours.clean_diff - ld(clean_logits)) <= TOL
    resid = tl_patching.get_act_patch_resid_pre(bridge, _tokens(CORRUPT), clean_cache, metric)
    heads = tl_patching.get_act_patch_attn_head_out_all_pos(bridge, _tokens(CORRUPT), clean_cache, metric)
    # TransformerLens collects the patched metrics in a float32 tensor (even from a float64
    # model), so its results carry float32 round-off: the gate is 1e-6 here.
    assert resid.dtype == heads.dtype == torch.float32
    resid, heads = to_numpy(resid), to_numpy(heads)
    _gate("patching, resid_pre per (layer, position), normalised logit diff", ours.resid, resid, 1e-6)
    _gate("patching, each head's output (hook_z), all positions", ours.heads, heads, 1e-6)
    assert abs(ours.resid[0, 1] - 1.0) > 1e-3 or abs(ours.resid[0, -1] - 1.0) > 1e-3  # not trivial
    _control("patching, position off by one", ours.resid[:, 1:], resid[:, :-1], 1e-6)
    _control("patching, heads 0 and 1 swapped", ours.heads[:, [1, 0, 2, 3]], heads, 1e-6)


def _tl_ablation(bridge, ids, layer, head, value):
    """TransformerLens's loss with head ``head`` (or the MLP when None) of ``layer`` replaced."""
    def fn(act, hook):
        act = act.clone()
        if head is None:
            act[...] = torch.as_tensor(value, dtype=act.dtype)
        else:
            act[:, :, head] = torch.as_tensor(value, dtype=act.dtype)
        return act
    name = f"blocks.{layer}.hook_mlp_out" if head is None else f"blocks.{layer}.attn.hook_z"
    return float(bridge.run_with_hooks(_tokens(ids), return_type="loss", fwd_hooks=[(name, fn)]))


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablation_equals_transformer_lens(pair, method):
    model, bridge = pair
    ours = ablate(model, CLEAN, method, reference=REFERENCE if method == "mean" else None)
    clean = float(bridge(_tokens(CLEAN), return_type="loss"))
    assert abs(ours.clean - clean) <= TOL
    _, ref_cache = bridge.run_with_cache(torch.tensor(REFERENCE))
    L, nh = SMALL["n_layer"], SMALL["n_head"]
    heads, mlps = np.zeros((L, nh)), np.zeros(L)
    for l in range(L):
        z_mean = to_numpy(ref_cache[f"blocks.{l}.attn.hook_z"]).mean(axis=(0, 1))  # (nh, hs)
        mlp_mean = to_numpy(ref_cache[f"blocks.{l}.hook_mlp_out"]).mean(axis=(0, 1))  # (C,)
        for h in range(nh):
            value = 0.0 if method == "zero" else z_mean[h]
            heads[l, h] = _tl_ablation(bridge, CLEAN, l, h, value) - clean
        mlps[l] = _tl_ablation(bridge, CLEAN, l, None, 0.0 if method == "zero" else mlp_mean) - clean
    _gate(f"ablation ({method}), each head: change in loss", ours.heads, heads)
    _gate(f"ablation ({method}), each MLP: change in loss", ours.mlps, mlps)
    _control(f"ablation ({method}), heads 0 and 1 swapped", ours.heads[:, [1, 0, 2, 3]], heads)


def test_ablation_with_logit_difference(pair):
    model, _ = pair
    ours = ablate(model, CLEAN, "zero", answer=ANSWER, wrong=WRONG)
    assert ours.metric == "logit diff"
    clean = model.run_with_hooks(CLEAN)[0, -1]
    assert abs(ours.clean - (clean[ANSWER] - clean[WRONG])) <= TOL
    z = lambda a, hook: a.__setitem__((slice(None), slice(None), 2), 0.0)  # noqa: E731
    ablated = model.run_with_hooks(CLEAN, [("blocks.1.attn.hook_z", z)])[0, -1]
    assert abs(ours.heads[1, 2] - (ablated[ANSWER] - ablated[WRONG] - ours.clean)) <= TOL


def test_mean_ablation_averages_reference_prompts_of_different_lengths(pair):
    model, _ = pair
    refs = [[15496, 13, 314], [40, 588, 262, 3290, 13]]
    ours = ablate(model, CLEAN, "mean", reference=refs)
    zs = [model.run_with_cache(r, ["blocks.1.attn.hook_z"])[1]["blocks.1.attn.hook_z"][0] for r in refs]
    mean = np.concatenate(zs).mean(axis=0)  # (nh, hs) over all 8 positions

    def put(z, hook):
        z[:, :, 3] = mean[3]
    logits = model.run_with_hooks(CLEAN, [("blocks.1.attn.hook_z", put)])
    logp = logits[0, :-1] - np.log(np.exp(logits[0, :-1]).sum(-1, keepdims=True))
    loss = -logp[np.arange(len(CLEAN) - 1), CLEAN[1:]].mean()
    assert abs(ours.heads[1, 3] - (loss - ours.clean)) <= TOL


def test_attribution_equals_transformer_lens(pair):
    model, bridge = pair
    ours = attribute(model, CLEAN, ANSWER, position=-1)
    _, cache = bridge.run_with_cache(_tokens(CLEAN))
    gamma = bridge.ln_final.weight.detach()
    direction = bridge.tokens_to_residual_directions(ANSWER).detach()  # W_U[:, ANSWER]
    stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # (L nh, 1, C)
    heads = to_numpy((stack * gamma) @ direction).reshape(SMALL["n_layer"], SMALL["n_head"])
    parts, labels = cache.decompose_resid(layer=-1, apply_ln=True, pos_slice=-1, return_labels=True)
    parts = to_numpy((parts * gamma) @ direction)[:, 0]
    by = dict(zip(labels, parts))
    mlps = np.array([by[f"{l}_mlp_out"] for l in range(SMALL["n_layer"])])
    _gate("attribution, each head (frozen ln_final scale)", ours.heads, heads)
    _gate("attribution, each MLP (frozen ln_final scale)", ours.mlps, mlps)
    _gate("attribution, embeddings", np.array([ours.embed, ours.pos_embed]),
          np.array([by["embed"], by["pos_embed"]]))
    logit = model.run_with_hooks(CLEAN)[0, -1, ANSWER]
    assert abs(ours.logit - logit) <= TOL  # the terms add up to the logit exactly
    _control("attribution, heads 0 and 1 swapped", ours.heads[:, [1, 0, 2, 3]], heads)
    other = attribute(model, CLEAN, ANSWER, position=-2)
    _control("attribution, position off by one", other.heads, heads)


def test_inspect_refuses_bad_requests_in_one_line(pair):
    model, _ = pair
    with pytest.raises(InputError, match="equal length"):
        patch(model, CLEAN, CORRUPT[:-1], ANSWER, WRONG)
    with pytest.raises(InputError, match="nothing to restore"):
        patch(model, CLEAN, CLEAN, ANSWER, WRONG)
    with pytest.raises(InputError, match="mean ablation needs a reference"):
        ablate(model, CLEAN, "mean")
    with pytest.raises(InputError, match=r"method must be one of \['zero', 'mean'\]"):
        ablate(model, CLEAN, "resample")
    with pytest.raises(InputError, match=r"target token must be a token id in \[0, 50257\)"):
        logit_lens(model, CLEAN, target=50257)
    with pytest.raises(InputError, match="position must be in"):
        attribute(model, CLEAN, ANSWER, position=8)


def test_results_serialise_to_json(pair):
    model, _ = pair
    for result in (logit_lens(model, CLEAN[:3], target=ANSWER, k=2), attribute(model, CLEAN[:3], ANSWER)):
        assert json.loads(json.dumps(result.to_dict()))["ids"] == CLEAN[:3]


# ---------------------------------------------------------------------- numgpt inspect (CLI)

def _cli(capsys, *argv) -> tuple[int, str, str]:
    from numgpt.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_library_result_as_json_text_and_png(pair, capsys, tmp_path):
    from tl_oracle import gpt2_files

    model, _ = pair
    folder = tmp_path / "model"
    from numgpt.io.checkpoint import export_hf

    export_hf(model, folder)
    common = ["--model", str(folder), "--tokenizer", str(gpt2_files()), "--dtype", "float64",
              "--prompt", "The dog saw the dog"]
    code, out, _ = _cli(capsys, "inspect", "logit-lens", *common, "--target", " dog", "--json")
    assert code == 0
    got = json.loads(out)
    ids = [464, 3290, 2497, 262, 3290]
    want = logit_lens(model, ids, target=3290)
    assert got["ids"] == ids and np.array_equal(np.array(got["target_probs"]), want.target_probs)
    png = tmp_path / "patch.png"
    code, out, err = _cli(capsys, "inspect", "patch", *common, "--corrupted", "The cat saw the cat",
                          "--answer", " dog", "--wrong", " cat", "--png", str(png))
    assert code == 0 and "patch head output (hook_z)" in out and str(png) in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    want = patch(model, ids, [464, 3797, 2497, 262, 3797], 3290, 3797)
    assert f"clean logit diff {want.clean_diff:+.4f}" in out
    code, out, err = _cli(capsys, "inspect", "attribute", *common, "--target", " doghouse")
    gemm_line, err = err.split("\n", 1)
    assert gemm_line.startswith("numgpt: GEMM library ")  # every computing command names it first
    assert code == 2 and err.count("\n") == 1 and "encodes to 3 tokens" in err


# ------------------------------------------------------------- POST /v1/inspect (playground)

def _byte_model():
    from numgpt.core.config import GPTConfig
    from numgpt.core.model import GPT
    from numgpt.io.tokenizer import ByteTokenizer

    m = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32, dtype="float64"), seed=7)
    for block in m.h:  # weights that make the views differ from position to position
        block.attn.c_attn.weight.data *= 6.0
        block.mlp.c_fc.weight.data *= 4.0
    m.tokenizer = ByteTokenizer()
    return m


def test_inspect_endpoint_answers_what_the_library_computes_and_refuses_in_one_line():
    from starlette.testclient import TestClient

    from numgpt.serve.app import ServerConfig, create_app

    model = _byte_model()
    key = {"Authorization": "Bearer k-123"}
    with TestClient(create_app(ServerConfig(model_name="tiny", api_key="k-123"), model=model),
                    raise_server_exceptions=False, base_url="http://localhost") as client:
        post = lambda body, h=key: client.post("/v1/inspect", json=body, headers=h)  # noqa: E731
        assert post({"view": "logit-lens", "prompt": "ab"}, {}).status_code == 401
        r = post({"view": "logit-lens", "prompt": "the cat sat", "target": "t", "top_k": 3})
        assert r.status_code == 200, r.text
        body, want = r.json(), logit_lens(model, list(b"the cat sat"), target=ord("t"), k=3)
        assert body["layers"] == want.layers == ["L0 in", "L1 in", "final"]
        assert np.array_equal(np.array(body["target_probs"]), want.target_probs)
        assert np.array_equal(np.array(body["top_probs"]), want.top_probs)
        from numgpt.serve.protocol import token_str
        assert body["top_tokens"][2][0] == [token_str(model.tokenizer, int(t)) for t in want.top_ids[2][0]]
        assert body["target"] == "t" and body["tokens"] == list("the cat sat")
        r = post({"view": "patch", "prompt": "the cat sat", "corrupted": "the dog sat",
                  "answer": " ", "wrong": 100})
        assert r.status_code == 200, r.text
        body, want = r.json(), patch(model, list(b"the cat sat"), list(b"the dog sat"), 32, 100)
        assert np.array_equal(np.array(body["resid"]), want.resid)
        assert np.array_equal(np.array(body["heads"]), want.heads)
        assert body["clean_diff"] == want.clean_diff and body["answer"] == " " and body["wrong"] == "d"
        for request, param, code in (
                ({"view": "lens", "prompt": "a"}, "view", "invalid_value"),
                ({"view": "logit-lens", "prompt": "a" * 65}, "prompt", "prompt_too_long"),
                ({"view": "logit-lens", "prompt": "a", "top_k": 11}, "top_k", "invalid_value"),
                ({"view": "logit-lens", "prompt": "a", "target": "ab"}, "target", "invalid_value"),
                ({"view": "patch", "prompt": "a" * 33, "corrupted": "b" * 33, "answer": 1, "wrong": 2},
                 "prompt", "prompt_too_long"),
                ({"view": "patch", "prompt": "ab", "corrupted": "abc", "answer": 1, "wrong": 2},
                 "corrupted", "invalid_value"),
                ({"view": "patch", "prompt": "ab", "corrupted": "cd", "wrong": 2}, "answer", "invalid_value"),
                ({"view": "patch", "prompt": "ab", "corrupted": "ab", "answer": 1, "wrong": 2},
                 "prompt", "invalid_value")):  # same prompt twice: nothing to restore
            r = post(request)
            error = r.json()["error"]
            assert r.status_code == 400 and (error["param"], error["code"]) == (param, code), r.text
            assert "\n" not in error["message"]


# ------------------------------------------------- the playground's view, in Chromium

def test_playground_logit_lens_and_patching_views_show_the_library_numbers(tmp_path):
    """The page's "Logit lens and patching" card against numgpt.inspect on the same model
    (the server subprocess loads the checkpoint this test saved and computes from)."""
    import shutil
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from servers import serve_subprocess

    from numgpt.io.checkpoint import save

    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if chromium is None or shutil.which("chromedriver") is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install -y "
                    "chromium chromium-driver)")
    model = _byte_model()
    prefix = save(model, tmp_path / "tiny")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with serve_subprocess(prefix, tmp_path / "server.log", "--log-level", "warning") as (url, _):
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                                  options=options)
        try:
            js = driver.execute_script

            def wait(predicate, what):
                deadline = time.monotonic() + 60
                while not predicate():
                    error = js("return document.getElementById('error').textContent")
                    assert time.monotonic() < deadline, f"timed out waiting for {what}: {error!r}"
                    time.sleep(0.05)

            def run_view(fields: dict) -> None:
                js("document.getElementById('look-main').dataset.values = ''")
                for element, value in fields.items():
                    js("document.getElementById(arguments[0]).value = arguments[1];"
                       "document.getElementById(arguments[0]).dispatchEvent(new Event('change'))",
                       element, value)
                js("document.getElementById('look-run').click()")
                wait(lambda: js("return document.getElementById('look-main').dataset.values"),
                     "the table")

            def shown(table: str) -> np.ndarray:
                return np.array(json.loads(js(f"return document.getElementById('{table}').dataset.values")))

            driver.get(url + "/")
            wait(lambda: js("return document.body.dataset.ready === '1'"), "the page")
            run_view({"look-view": "logit-lens", "look-prompt": "the cat sat", "look-target": "t"})
            want = logit_lens(model, list(b"the cat sat"), target=ord("t"))
            assert np.array_equal(shown("look-main"), want.target_probs)
            tops = js("return [...document.querySelectorAll('#look-main tbody tr td')].map(td => td.textContent)")
            assert len(tops) == 3 * 11  # (L + 1) x T cells, each the top token
            run_view({"look-view": "patch", "look-prompt": "the cat sat", "look-corrupted": "the dog sat",
                      "look-answer": " ", "look-wrong": "d"})
            want = patch(model, list(b"the cat sat"), list(b"the dog sat"), 32, 100)
            assert np.array_equal(shown("look-main"), want.resid)
            assert np.array_equal(shown("look-heads"), want.heads)
            assert js("return document.getElementById('look-heads').hidden") is False
            assert js("return document.getElementById('error').hidden") is True
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert severe == [], severe
        finally:
            driver.quit()
