"""The README's chat recipe, short: numgpt chat-data writes questions 'N+1' with a fifth of
the N held out, prepare --chat renders them with the set's template, a byte-level model
trains for 600 steps (the README runs 1200), and it must answer held-out questions far
better than a shuffled-answer baseline: the answers of the same questions in another order."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

import numgpt
from numgpt.core.model import GPT
from numgpt.cli import main
from numgpt.infer import chat as session
from numgpt.infer.sample import SamplingParams
from numgpt.io import chat, data
from numgpt.io.tokenizer import ByteTokenizer
from servers import REPO

# the README's `numgpt train` flags for the recipe, but --max-iters (the README runs 1200)
TRAIN_FLAGS = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "64",
               "--batch-size", "32", "--warmup-iters", "20", "--learning-rate", "3e-3",
               "--min-lr", "3e-4", "--eval-interval", "300", "--eval-iters", "5",
               "--sample-tokens", "0"]


def _answers(model, questions):
    return [bytes(session.reply_tokens(model, [{"role": "user", "content": q}], 6,
                                       SamplingParams(temperature=0))).decode("utf-8", "replace")
            for q in questions]


def test_chat_data_writes_disjoint_training_and_held_out_questions(tmp_path, capsys):
    assert main(["chat-data", "--out", str(tmp_path / "cd")]) == 0
    assert "640 training conversations, 20 held-out questions" in capsys.readouterr().out
    train = [json.loads(line)["messages"] for line in open(tmp_path / "cd" / "train.jsonl")]
    held = [json.loads(line)["messages"] for line in open(tmp_path / "cd" / "heldout.jsonl")]
    asked = {m[0]["content"] for m in train}
    assert len(asked) == 80 and not asked & {m[0]["content"] for m in held}
    assert all(m[1]["content"] == str(int(m[0]["content"][:-2]) + 1) for m in train + held)
    assert (tmp_path / "cd" / "questions.txt").read_text().splitlines() == \
        [m[0]["content"] for m in held]
    assert chat.read_template_file(tmp_path / "cd" / "template.jinja") == chat.QA_TEMPLATE + "\n"


def test_a_short_fine_tune_answers_held_out_questions_above_the_shuffled_baseline(tmp_path):
    """The README's commands (numgpt train as a command: it picks its workers and BLAS
    threads, 4x faster here than train() in a process whose NumPy is loaded already)."""
    t0 = time.perf_counter()
    files = chat.write_arithmetic_set(tmp_path / "cd")
    data.prepare_chat(files["train"], ByteTokenizer(), tmp_path / "prepared",
                      val_fraction=0.05, template=chat.read_template_file(files["template"]))
    run = subprocess.run([sys.executable, "-m", "numgpt", "train", "--data",
                          str(tmp_path / "prepared"), "--out", str(tmp_path / "run"), *TRAIN_FLAGS,
                          "--max-iters", "600", "--no-plot", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    model = numgpt.load(tmp_path / "run")
    assert model.chat_template == chat.QA_TEMPLATE + "\n"  # carried from the prepared data
    held = [json.loads(line)["messages"] for line in open(files["heldout"])]
    questions, truth = [m[0]["content"] for m in held], [m[1]["content"] for m in held]
    got = _answers(model, questions)
    accuracy = np.mean([g == t for g, t in zip(got, truth)])
    shuffled = [truth[i] for i in np.random.default_rng(0).permutation(len(truth))]
    baseline = np.mean([s == t for s, t in zip(shuffled, truth)])
    print(f"held-out accuracy {accuracy:.2f} (shuffled answers {baseline:.2f}) in "
          f"{time.perf_counter() - t0:.0f} s: {list(zip(questions, got))}")
    assert accuracy >= 0.3 and accuracy >= baseline + 0.25
    untrained = GPT(model.config, seed=1)  # negative control: the same check fails
    untrained.tokenizer, untrained.chat_template = model.tokenizer, model.chat_template
    assert np.mean([g == t for g, t in zip(_answers(untrained, questions), truth)]) < 0.3
