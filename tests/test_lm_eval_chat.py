"""lm-evaluation-harness's ``local-chat-completions`` model against a real ``numgpt serve``
(issue 23's verification): a ``generate_until`` task from a local JSONL file, offline, with
``apply_chat_template`` (what lm-eval's ``--apply_chat_template`` does for chat models: each
prompt becomes a user message). Each answer must equal ``numgpt generate --temperature 0``
on the prompt rendered with the model's chat template (numgpt's default here), stopping where
lm-eval asks (its ``until`` strings, sent as ``stop``) and at end-of-text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.io import chat  # noqa: E402
from numgpt.io.checkpoint import save  # noqa: E402
from numgpt.io.tokenizer import GPT2Tokenizer  # noqa: E402
from servers import REPO, serve_subprocess  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hello."]
GEN_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory, gpt2_tokenizer_dir):
    folder = tmp_path_factory.mktemp("lm_eval_chat")
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16,
                          dtype="float64"), seed=4)
    model.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    prefix = save(model, folder / "model")
    with serve_subprocess(prefix, folder / "server.log", "--log-level", "warning") as (url, _):
        yield folder, prefix, url, model.tokenizer


def _task(folder) -> str:
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": p, "answer": ""}) + "\n" for p in PROMPTS))
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "numgpt_chat.yaml").write_text(f"""\
task: numgpt_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {GEN_TOKENS}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return str(tasks)


def test_lm_eval_local_chat_completions_equals_numgpt_generate(served):
    folder, prefix, url, tok = served
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    lm = get_model("local-chat-completions").create_from_arg_string(
        f"base_url={url}/v1/chat/completions,model=numgpt")
    results = lm_eval.simple_evaluate(model=lm, tasks=["numgpt_chat"], log_samples=True,
                                      apply_chat_template=True,
                                      task_manager=TaskManager(include_path=_task(folder)))
    samples = results["samples"]["numgpt_chat"]
    answers = {s["doc"]["question"]: s["resps"][0][0] for s in samples}
    assert sorted(answers) == sorted(PROMPTS)
    ours = {}
    for prompt in PROMPTS:
        rendered = chat.render(None, [{"role": "user", "content": prompt}], tok,
                               add_generation_prompt=True)
        run = subprocess.run([sys.executable, "-m", "numgpt", "generate", "--model", str(prefix),
                              "--prompt", rendered, "-n", str(GEN_TOKENS), "--temperature", "0",
                              "--stop", "\n\n", "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        ours[prompt] = json.loads(run.stdout.splitlines()[0])["text"]
    assert answers == ours
    assert any(answers.values())  # the replies are not all empty
