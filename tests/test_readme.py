"""The README is tested: every ```bash / ```python block of README.md runs, in order, in one
sandbox folder holding small stand-ins for the files the blocks name, so a README change that
breaks a command fails the suite.

The harness (extraction, markers, running, servers) is tests/readme_blocks.py. What the suite
changes in a command before running it is the ``SUBSTITUTIONS`` table below, each with its
reason; nothing else is changed. Blocks that cannot run here carry a marker in the README,
``<!-- readme-test: skip: WHY -->``, and are reported as skipped with that reason.

Stand-ins (``sandbox``): ``gpt2/`` and ``gpt2-medium/`` are Hugging Face folders of
random-weight GPT-2s of a small shape with the real GPT-2 vocabulary and tokenizer files;
``my.txt``, ``wiki.test.raw`` and ``valid.txt`` are English text, ``lambada_test.jsonl`` a few
LAMBADA-style passages, ``my.toml`` a flat training config, ``benchmarks/`` a link to the
repository's folder (the README runs the scripts from the clone's root).
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import threading
from pathlib import Path

import pytest

import readme_blocks as rb
from servers import REPO, free_port

README = REPO / "README.md"
BLOCK_TIMEOUT = 300  # seconds for one block (the slowest took about 70 s on 2 cores shared 4-fold)

ITER_SCALE = 500  # `numgpt train` runs 1/500 of the steps the README asks for


def _fewer_steps(command: str, ctx: rb.Context) -> str:
    found = re.search(r"--max-iters[ =](\d+)", command)
    if found:
        steps = max(1, int(found.group(1)) // ITER_SCALE)
        command = command[:found.start()] + f"--max-iters {steps}" + command[found.end():]
    elif "--resume" not in command:  # a resume keeps the max_iters its run started with
        command += f" --max-iters {2000 // ITER_SCALE}"  # TrainConfig's default, scaled
    return command + " --eval-iters 2 --sample-tokens 20 --no-plot"


def _serve_in_background(command: str, ctx: rb.Context) -> str:
    command = command.rstrip().removesuffix("&").rstrip()
    ctx.port = ctx.new_port()
    url = f"http://127.0.0.1:{ctx.port}"
    return (f"{command} --port {ctx.port} >> {ctx.serve_log} 2>&1 & "
            f"readme_test_server $! {url}")


def _check_stated_output(command: str, ctx: rb.Context) -> str:
    stated = re.match(r"#\s*(\[[^\]]*\])", ctx.comment).group(1)
    return f"{command} | readme_test_expect {shlex.quote(stated)}"


# What the suite changes in README commands before running them, and why. Nothing else is
# changed; tests/readme_blocks.py applies them (test_every_substitution_is_used keeps the
# table free of entries that no longer match anything).
SUBSTITUTIONS = [
    rb.Substitution(
        "pip install", re.compile(r"^pip install -e \S+ && "),
        lambda c, ctx: re.sub(r"^pip install -e \S+ && ", "", c),
        "the suite runs inside that install already; pip would need the clone as the current "
        "folder and may need the network"),
    rb.Substitution(
        "fewer training steps", re.compile(r"\bnumgpt train\b"), _fewer_steps,
        f"training runs 1/{ITER_SCALE} of the steps (--max-iters N becomes N/{ITER_SCALE}; "
        f"no --max-iters and no --resume: the default 2000 becomes {2000 // ITER_SCALE}), "
        "evaluates 2 batches, samples 20 tokens and draws no plots (`numgpt plot` draws "
        "them), so the whole README runs in a few minutes on 2 cores; the commands, flags "
        "and files are the README's"),
    rb.Substitution(
        "benchmarks --help", re.compile(r"^python benchmarks/\S+\.py\b"),
        lambda c, ctx: c + " --help",
        "each benchmark takes minutes; --help proves the script the README names exists and "
        "starts"),
    rb.Substitution(
        "server in the background", re.compile(r"^numgpt serve\b.*&$"), _serve_in_background,
        "`numgpt serve ... &` gets a free port of its own (8000 may be taken on a shared "
        "machine, or by a server an earlier block left running) and "
        "its log in a file; the block goes on once /health answers (typed by hand, the next "
        "command comes later anyway); the server is stopped at the end of the README section"),
    rb.Substitution(
        "port", re.compile(r"(127\.0\.0\.1|localhost):8000\b"),
        lambda c, ctx: re.sub(r"(127\.0\.0\.1|localhost):8000\b", rf"\g<1>:{ctx.port}", c),
        "the README's 127.0.0.1:8000 becomes the port the last server got",
        langs=("shell", "python")),
    rb.Substitution(
        "stated output", re.compile(r""), _check_stated_output,
        "a command whose comment starts with a list (`numgpt tokenize ... \"Hello.\"  # [15496, "
        "13]`) states what it prints: its output must start with that list",
        when=lambda ctx: re.match(r"#\s*\[", ctx.comment) is not None),
    rb.Substitution(
        "curl fails on HTTP errors", re.compile(r"^curl\b"),
        lambda c, ctx: "curl --fail-with-body" + c[len("curl"):],
        "curl exits 0 on an HTTP error (a 404 or 400 would pass silently); --fail-with-body "
        "makes it exit 22 and still prints the server's answer"),
]

BLOCKS, PROBLEMS = rb.parse(README.read_text(encoding="utf-8"))
RUNNABLE = [(i, b) for i, b in enumerate(BLOCKS) if b.kind is not None]


# ----------------------------------------------------------------------- stand-ins

PASSAGES = [
    "Anna found an old lantern in the attic. After dinner Anna showed everyone the lantern",
    "The children walked for hours along the river. When the sun went down they all went home",
    "Tom dropped the violin on the stairs. The next morning he took it to be repaired, and the "
    "man at the shop said he had never seen such a damaged violin",
]


def _english(n_chars: int) -> str:
    """Plain English text of about ``n_chars`` characters: the Python docs' topics (every
    Python install has them), as `numgpt train` uses them by default."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:n_chars]


def _hf_folder(folder: Path, tokenizer, seed: int) -> None:
    """A random-weight GPT-2 of a small shape (n_embd a multiple of 32: q8_0 blocks) with the
    real vocabulary, written as a Hugging Face folder with its tokenizer files."""
    from numgpt.core.model import GPT, GPTConfig
    from numgpt.io.checkpoint import export_hf
    model = GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=32),
                seed=seed)
    model.tokenizer = tokenizer
    export_hf(model, folder)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, gpt2_tokenizer_dir):
    from numgpt.io.tokenizer import GPT2Tokenizer
    box = tmp_path_factory.mktemp("readme")
    tok = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    _hf_folder(box / "gpt2", tok, seed=0)
    _hf_folder(box / "gpt2-medium", tok, seed=1)
    (box / "my.txt").write_text(_english(40_000), encoding="utf-8")
    (box / "wiki.test.raw").write_text(" = Python = \n\n" + _english(2_000), encoding="utf-8")
    (box / "valid.txt").write_text(_english(800), encoding="utf-8")
    (box / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES), encoding="utf-8")
    (box / "my.toml").write_text('data = "data/mine"\nout = "runs/toml"\n', encoding="utf-8")
    (box / "benchmarks").symlink_to(REPO / "benchmarks", target_is_directory=True)
    return box


@pytest.fixture(scope="module")
def session(sandbox):
    s = rb.Session(BLOCKS, sandbox, SUBSTITUTIONS, rb.Context(new_port=free_port), BLOCK_TIMEOUT)
    yield s
    s.close()


# ----------------------------------------------------------------------- the README

def test_readme_blocks_are_well_formed():
    assert PROBLEMS == [], "README.md:\n" + "\n".join(PROBLEMS)
    assert len(RUNNABLE) >= 10, f"only {len(RUNNABLE)} runnable blocks found in README.md"


def test_readme_says_its_blocks_are_tested():
    top = README.read_text(encoding="utf-8").split("\n## ")[1]  # the "Two commands" section
    assert "tests/test_readme.py" in top, \
        "the README's first section must say the suite runs its blocks"


def _judge(block: rb.Block, run: rb.Run) -> None:
    """Pass, fail or xfail one block's run; an xfail marker is strict (a passing block must
    lose its marker)."""
    if block.mark == "xfail":
        if not run.ok:
            pytest.xfail(f"README line {block.line}: {block.reason}")
        pytest.fail(f"README line {block.line} is marked xfail ({block.reason}) but passes: "
                    f"remove its marker")
    assert run.ok, run.report()


@pytest.mark.parametrize("index,block", RUNNABLE, ids=[b.id for _, b in RUNNABLE])
def test_readme_block(session, index, block):
    if block.mark == "skip":
        pytest.skip(f"README line {block.line}: {block.reason}")
    _judge(block, session.result(index))


def test_every_substitution_is_used():
    ctx = rb.Context(new_port=lambda: 1)
    for block in BLOCKS:
        if block.kind is not None and block.mark != "skip":
            rb.script_for(block, SUBSTITUTIONS, ctx)
    unused = [s.name for s in SUBSTITUTIONS if s.name not in ctx.used]
    assert unused == [], f"substitutions that match no README command: {unused}"


# ----------------------------------------------------------------------- the harness itself

def _blocks(markdown: str) -> list[rb.Block]:
    blocks, problems = rb.parse(markdown)
    assert problems == []
    return blocks


def _run(markdown: str, tmp_path: Path, subs=()) -> rb.Run:
    [block] = _blocks(markdown)
    return rb.run_block(block, tmp_path, list(subs), rb.Context(new_port=free_port), 120)


def test_a_misspelt_flag_fails_its_block(tmp_path):
    good = _run("```bash\nnumgpt tokenize --tokenizer bytes Hi\n```\n", tmp_path)
    assert good.ok, good.report()
    bad = _run("```bash\nnumgpt tokenize --tokeniser bytes Hi\nnumgpt --version\n```\n", tmp_path)
    assert bad.returncode == 2 and "numgpt tokenize: error" in bad.stderr
    assert bad.stdout == ""  # -e: the block stops at the failing line


def test_a_failing_pipe_or_python_block_fails(tmp_path):
    assert not _run("```bash\nfalse | cat\n```\n", tmp_path).ok  # pipefail
    assert _run("```python\nimport numgpt\nprint(numgpt.load)\n```\n", tmp_path).ok
    bad = _run("```python\nimport numgpt\nnumgpt.no_such_function()\n```\n", tmp_path)
    assert not bad.ok and "AttributeError" in bad.stderr


def test_an_xfail_marker_is_strict(tmp_path):
    failing, passing = _blocks("<!-- readme-test: xfail: waits for a fix -->\n```bash\nfalse\n```\n"
                               "<!-- readme-test: xfail: waits for a fix -->\n```bash\ntrue\n```\n")
    ctx = rb.Context(new_port=lambda: 1)
    with pytest.raises(pytest.xfail.Exception, match="waits for a fix"):
        _judge(failing, rb.run_block(failing, tmp_path, [], ctx, 60))
    with pytest.raises(pytest.fail.Exception, match="remove its marker"):
        _judge(passing, rb.run_block(passing, tmp_path, [], ctx, 60))
    with pytest.raises(AssertionError, match="exit status 1"):
        _judge(rb.Block(1, "bash", "false\n", "s"), rb.run_block(failing, tmp_path, [], ctx, 60))


def test_servers_a_section_started_are_stopped_when_the_next_section_starts(tmp_path):
    markdown = ("## A\n```bash\nsleep 300 &\necho $! >> .readme-test/servers\n```\n"
                "```bash\ntrue\n```\n## B\n```bash\ntrue\n```\n")
    session = rb.Session(_blocks(markdown), tmp_path, [], rb.Context(new_port=lambda: 1), 60)
    try:
        assert session.result(0).ok
        pid = int((tmp_path / ".readme-test" / "servers").read_text())
        assert session.result(1).ok and not rb._gone(pid)  # same section: still running
        assert session.result(2).ok and rb._gone(pid)      # next section: stopped
    finally:
        session.close()


def test_a_block_that_hangs_is_stopped(tmp_path):
    [block] = _blocks("```bash\nsleep 60\n```\n")
    run = rb.run_block(block, tmp_path, [], rb.Context(new_port=lambda: 1), timeout=1)
    assert run.returncode is None and not run.ok and run.seconds < 30


def test_malformed_markdown_is_reported():
    cases = {
        "<!-- readme-test: skip: needs X -->\nsome text\n```bash\ntrue\n```\n": "not followed",
        "```bash\ntrue\n```\n<!-- readme-test: skip: needs X -->\n": "not followed",
        "```\nnumgpt train\n```\n": "no language",
        "<!-- readme-test: skp: needs X -->\n```bash\ntrue\n```\n": "must be",
        "<!-- readme-test: skip -->\n```bash\ntrue\n```\n": "malformed",
        "<!-- readme-test: skip: X -->\n```text\nnode1:2\n```\n": "never runs",
        "```bash\ntrue\n": "never closed",
    }
    for markdown, expected in cases.items():
        _, problems = rb.parse(markdown)
        assert len(problems) == 1 and expected in problems[0], (markdown, problems)
    blocks, problems = rb.parse("<!-- readme-test: skip: needs X -->\n\n```bash\ntrue\n```\n"
                                "```text\nnode1:2\n```\n")
    assert problems == [] and [(b.mark, b.reason, b.kind) for b in blocks] == \
        [("skip", "needs X", "shell"), (None, "", None)]


def test_shell_rewriting_keeps_comments_continuations_and_heredocs():
    sub = rb.Substitution("x", re.compile(r"^numgpt\b"), lambda c, ctx: c + " --extra", "test")
    code = ("numgpt a \\\n  --b 1   # say '#' here\n"
            "cat > t.yaml <<'EOF'\nnumgpt inside: heredoc\nEOF\n"
            "echo '# not a comment' numgpt\n")
    ctx = rb.Context(new_port=lambda: 1)
    assert rb.rewrite_shell(code, [sub], ctx) == (
        "numgpt a \\\n  --b 1 --extra  # say '#' here\n"
        "cat > t.yaml <<'EOF'\nnumgpt inside: heredoc\nEOF\n"
        "echo '# not a comment' numgpt\n")
    assert ctx.used == {"x"}
    assert rb.console_to_shell("$ numgpt --version\nnumgpt 1.0\n") == "numgpt --version\n"


def test_the_substitutions_rewrite_what_they_say():
    ctx = rb.Context(new_port=lambda: 1234)

    def sub(command):
        return rb.rewrite_shell(command + "\n", SUBSTITUTIONS, ctx).strip()

    assert sub("pip install -e . && numgpt train") == \
        "numgpt train --max-iters 4 --eval-iters 2 --sample-tokens 20 --no-plot"
    assert sub("numgpt train --out r --max-iters 5000  # c") == \
        "numgpt train --out r --max-iters 10 --eval-iters 2 --sample-tokens 20 --no-plot  # c"
    assert sub("mpiexec -n 2 numgpt train --out r --resume") == \
        "mpiexec -n 2 numgpt train --out r --resume --eval-iters 2 --sample-tokens 20 --no-plot"
    assert sub("numgpt serve --model gpt2/ &") == (
        "numgpt serve --model gpt2/ --port 1234 >> .readme-test/serve.log 2>&1 & "
        "readme_test_server $! http://127.0.0.1:1234")
    assert sub("curl -s http://127.0.0.1:8000/v1/models") == \
        "curl --fail-with-body -s http://127.0.0.1:1234/v1/models"
    assert sub("python benchmarks/bench_forward.py  # c") == \
        "python benchmarks/bench_forward.py --help  # c"
    assert sub('numgpt tokenize --model gpt2/ "Hello."  # [15496, 13], GPT-2') == (
        "numgpt tokenize --model gpt2/ \"Hello.\" | readme_test_expect '[15496, 13]'"
        "  # [15496, 13], GPT-2")


def test_a_command_that_prints_other_than_its_comment_says_fails(tmp_path):
    stated = [s for s in SUBSTITUTIONS if s.name == "stated output"]
    right = "```bash\nnumgpt tokenize --tokenizer bytes Hi   # [72, 105]\n```\n"
    run = _run(right, tmp_path, stated)
    assert run.ok and run.stdout.strip() == "[72, 105]", run.report()
    run = _run(right.replace("105", "106"), tmp_path, stated)
    assert not run.ok and "the README says '[72, 106]'" in run.stderr


def test_each_server_gets_its_own_port_and_the_commands_after_it_use_it():
    ports = iter([1001, 1002])
    ctx = rb.Context(new_port=lambda: next(ports))
    code = ("numgpt serve --model a/ &\ncurl -s http://127.0.0.1:8000/x\n"
            "numgpt serve --model b/ &\ncurl -s http://127.0.0.1:8000/y\n")
    lines = rb.rewrite_shell(code, SUBSTITUTIONS, ctx).splitlines()
    assert "--port 1001 " in lines[0] and "127.0.0.1:1001/x" in lines[1]
    assert "--port 1002 " in lines[2] and "127.0.0.1:1002/y" in lines[3]
    assert rb.rewrite_python('OpenAI(base_url="http://127.0.0.1:8000/v1")', SUBSTITUTIONS,
                             ctx) == 'OpenAI(base_url="http://127.0.0.1:1002/v1")'


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b'{"error": "nothing here"}')

    def log_message(self, *args):
        pass


def test_curl_at_an_http_error_fails_only_with_the_substitution(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        markdown = f"```bash\ncurl -s http://127.0.0.1:{server.server_port}/missing\n```\n"
        assert _run(markdown, tmp_path).ok  # plain curl: the 404 passes unnoticed
        curl = [s for s in SUBSTITUTIONS if s.name == "curl fails on HTTP errors"]
        run = _run(markdown, tmp_path, curl)
        assert run.returncode == 22 and "nothing here" in run.stdout
    finally:
        server.shutdown()
        server.server_close()
