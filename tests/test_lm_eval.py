"""lm-evaluation-harness (``local-completions``) against a real ``numgpt serve`` subprocess,
driven as a user drives it, offline, on local JSONL tasks defined by task YAML files.

The model is a tiny GPT with the real GPT-2 tokenizer, trained for a few optimizer steps on
the LAMBADA-style passages it is then scored on (so the accuracy is not zero), and served in
float64 (the server's KV-cache decode and ``numgpt eval``'s full forward then agree to
float64 rounding). Gates:

- lm-eval's LAMBADA ``perplexity`` (exp of minus the mean per-example log-likelihood) and
  ``acc`` equal ``numgpt eval --lambada`` on the same file (``word_perplexity``,
  ``accuracy``) to 1e-8, once with lm-eval's remote tokenizer (what its default ``auto``
  picks against this server; only ``base_url`` given) and once with a local Hugging Face
  tokenizer folder built from the same GPT-2 files;
- a ``generate_until`` task's answers equal ``numgpt generate --temperature 0``.

Rows go to ``docs/results/eval_parity.md`` through ``tests/results_table.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.io.checkpoint import load, save  # noqa: E402
from numgpt.io.tokenizer import GPT2Tokenizer  # noqa: E402
from numgpt.train.loop import train_step  # noqa: E402
from numgpt.train.optim import AdamW  # noqa: E402

import results_table  # noqa: E402
from servers import REPO, serve_subprocess  # noqa: E402

TOL = 1e-8
NAMES = ["Anna", "Tom", "Maria", "Peter", "Lucy", "Sam", "Clara", "Ben", "Ivan", "Rosa"]
OBJECTS = ["lantern", "violin", "basket", "compass", "kettle", "ribbon", "hammer", "mirror",
           "candle", "saddle"]
PROMPTS = ["Anna and the others walked", "After dinner Tom showed"]
GEN_TOKENS = 8


def passages() -> list[str]:
    """LAMBADA-style: the last word is what a reader of the passage would guess."""
    out = []
    for i, (name, thing) in enumerate(zip(NAMES, OBJECTS)):
        if i % 3 == 1:
            out.append(f"{name} found an old {thing} in the attic. After dinner {name} showed "
                       f"everyone the {thing}")
        else:
            out.append(f"{name} and the others walked for hours. When the sun went down they "
                       f"all went home")
    return out


def _trained_model(tok: GPT2Tokenizer) -> GPT:
    """25 full-batch AdamW steps on the passages (each passage one row, grouped by length)."""
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    model.tokenizer = tok
    by_length: dict[int, list[list[int]]] = {}
    for text in passages():
        ids = tok.encode(text)
        by_length.setdefault(len(ids), []).append(ids)
    batches = [(np.asarray(g)[:, :-1], np.asarray(g)[:, 1:]) for g in by_length.values()]  # (B, T)
    opt = AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    for step in range(25):
        train_step(model, opt, batches, lr=3e-2, grad_clip=1.0, step=step)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_tokenizer_dir):
    """(folder, served model prefix, LAMBADA file, generation file), made once."""
    folder = tmp_path_factory.mktemp("lm_eval")
    tok = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    trained = save(_trained_model(tok), folder / "trained")
    prefix = save(load(trained, dtype="float64"), folder / "model")  # served and scored in float64
    lambada = folder / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages()))
    gen = folder / "generate.jsonl"
    gen.write_text("".join(json.dumps({"prompt": p, "target": ""}) + "\n" for p in PROMPTS))
    return folder, prefix, lambada, gen


@pytest.fixture(scope="module")
def ours(setup) -> dict:
    """``numgpt eval --lambada --json`` on the served checkpoint and the same file."""
    _, prefix, lambada, _ = setup
    result = _numgpt_eval(prefix, lambada)
    assert result["accuracy"] > 0, "the trained model should guess some last words"
    return result


@pytest.fixture(scope="module")
def server(setup):
    folder, prefix, _, _ = setup
    with serve_subprocess(prefix, folder / "server.log", "--log-level", "warning") as (url, _):
        yield url


def _write_tasks(folder: Path, lambada: Path, gen: Path) -> Path:
    """Two task YAMLs in the shape of lm-eval's lambada_openai, reading local JSONL files."""
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "numgpt_lambada.yaml").write_text(f"""\
task: numgpt_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {lambada}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "numgpt_generate.yaml").write_text(f"""\
task: numgpt_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {GEN_TOKENS}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return tasks


def _offline_env() -> None:
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"


def _lm_eval(base_url: str, tasks: Path, names: list[str], **model_args) -> tuple[object, dict]:
    """lm_eval.simple_evaluate, as ``lm_eval --model local-completions --model_args ...
    --tasks ... --include_path ... --log_samples`` runs it. Returns (the LM, the results)."""
    _offline_env()
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in {"base_url": base_url, **model_args}.items())
    lm = get_model("local-completions").create_from_arg_string(args)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks)))
    return lm, results


def _numgpt_eval(prefix: Path, lambada: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "numgpt", "eval", "--model", str(prefix),
                          "--lambada", str(lambada), "--json", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["lambada"]


def _hf_tokenizer_folder(gpt2_dir: Path, folder: Path) -> Path:
    """A local Hugging Face tokenizer folder from the GPT-2 vocab.json + merges.txt."""
    out = folder / "hf_tokenizer"
    vocab = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (gpt2_dir / "merges.txt").read_text(encoding="utf-8").split("\n")  # not splitlines:
    merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]  # U+0085 is a token
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.save_pretrained(out)
    return out


def _compare(case: str, lm_eval_metrics: dict, ours: dict) -> None:
    pairs = [("perplexity", lm_eval_metrics["perplexity,none"], ours["word_perplexity"]),
             ("acc", lm_eval_metrics["acc,none"], ours["accuracy"])]
    cells, ok = [], True
    for name, theirs, mine in pairs:
        rel = abs(theirs - mine) / max(abs(mine), 1e-300)
        cells.append(f"lm-eval {name} {theirs:.12g} vs numgpt eval {mine:.12g} (rel {rel:.1e})")
        ok &= rel <= TOL
    results_table.record("eval_parity.md", case, "; ".join(cells), f"{TOL:g}",
                         "PASS" if ok else "FAIL")
    for name, theirs, mine in pairs:
        assert theirs == pytest.approx(mine, rel=TOL, abs=0), name


@pytest.fixture(scope="module")
def remote_run(setup, server) -> tuple[object, dict]:
    """Both tasks in one lm-eval run with only base_url: its default tokenizer_backend
    ("auto") finds /tokenizer_info and /tokenize and uses the server's tokenizer; its
    default max_length is left alone."""
    folder, _, lambada, gen = setup
    tasks = _write_tasks(folder, lambada, gen)
    return _lm_eval(server + "/v1/completions", tasks, ["numgpt_lambada", "numgpt_generate"])


def test_lm_eval_remote_tokenizer_equals_numgpt_eval(remote_run, ours):
    lm, res = remote_run
    assert lm.tokenizer_backend == "remote"
    _compare(f"lm-eval local-completions, remote tokenizer: LAMBADA, {ours['examples']} passages",
             res["results"]["numgpt_lambada"], ours)


def test_lm_eval_local_hf_tokenizer_equals_numgpt_eval(setup, server, ours, gpt2_tokenizer_dir):
    folder, prefix, lambada, gen = setup
    tasks = _write_tasks(folder, lambada, gen)
    hf = _hf_tokenizer_folder(gpt2_tokenizer_dir, folder)
    lm, res = _lm_eval(server + "/v1/completions", tasks, ["numgpt_lambada"],
                       tokenizer_backend="huggingface", tokenizer=str(hf))
    assert lm.tokenizer_backend == "huggingface"
    _compare(f"lm-eval local-completions, local HF tokenizer: LAMBADA, {ours['examples']} passages",
             res["results"]["numgpt_lambada"], ours)


def test_lm_eval_generate_until_equals_numgpt_generate(setup, remote_run):
    _, prefix, _, _ = setup
    _, res = remote_run
    answers = {s["doc"]["prompt"]: s["resps"][0][0] for s in res["samples"]["numgpt_generate"]}
    ours = {}
    for prompt in PROMPTS:
        run = subprocess.run([sys.executable, "-m", "numgpt", "generate", "--model", str(prefix),
                              "--prompt", prompt, "-n", str(GEN_TOKENS), "--temperature", "0",
                              "--stop", "\n\n", "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        ours[prompt] = json.loads(run.stdout.splitlines()[0])["text"]
    same = sum(answers[p] == ours[p] for p in PROMPTS)
    results_table.record("eval_parity.md", f"lm-eval generate_until vs numgpt generate "
                         f"--temperature 0: {len(PROMPTS)} prompts, {GEN_TOKENS} tokens",
                         f"{same} of {len(PROMPTS)} answers identical "
                         f"(e.g. {PROMPTS[0]!r} -> {ours[PROMPTS[0]]!r})", "exact",
                         "PASS" if same == len(PROMPTS) else "FAIL")
    assert answers == ours
