"""Read the fenced code blocks of a Markdown file and run them as a reader would: shell blocks
in ``bash -euo pipefail``, Python blocks in a fresh ``python -``, all in one sandbox folder, in
order (tests/test_readme.py drives it over README.md).

Neither ``mktestdocs`` (its source runs each bash block as ``bash -e -u -c`` in the current
folder, with no pipefail, timeout, markers or servers, and ``exec`` s Python blocks inside the
test's own process) nor ``pytest-examples`` (Python blocks only) runs shell blocks this way, so
this is our own short extractor.

Rules a Markdown file follows (``parse`` reports every breach as a problem):
- every fenced block names its language; ``bash``/``sh``/``shell``/``console``/``python`` run,
  ``text`` (or ``toml``, ``json``, ...) declares a block that is not a command;
- a runnable block that cannot run in the suite has a marker right before it (blank lines
  between are allowed), ``<!-- readme-test: skip: WHY -->``, or, while a fix it waits for has
  not landed, ``<!-- readme-test: xfail: WHY -->``; a marker not followed by a runnable block
  is a problem.

Shell lines are rewritten before they run by a table of ``Substitution`` s (kept, with the
reason for each, in tests/test_readme.py); ``numgpt serve ... &`` lines become a server on a
free port that the harness waits for and stops at the end of the README section (``## ``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RUN_LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "console": "console",
             "python": "python"}
MARKS = ("skip", "xfail")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
MARKER = re.compile(r"^<!--\s*readme-test:\s*([\w-]+)\s*:\s*(.*?)\s*-->$")
HEREDOC = re.compile(r"<<(-?)\s*(['\"]?)([A-Za-z_]\w*)\2")


@dataclass(frozen=True)
class Block:
    line: int      # 1-based line of the opening fence
    lang: str      # as written after the fence ('' when none)
    code: str
    section: str   # the "## " heading it sits under
    mark: str | None = None   # "skip" / "xfail" from a marker right before it
    reason: str = ""

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'nolang'}"

    @property
    def kind(self) -> str | None:
        """'shell', 'console' or 'python' for a block that runs; None for text."""
        return RUN_LANGS.get(self.lang)


def parse(text: str) -> tuple[list[Block], list[str]]:
    """Every fenced block of ``text`` in order, and the problems found (see module docstring)."""
    lines = text.split("\n")
    blocks: list[Block] = []
    problems: list[str] = []
    section = "(top)"
    pending: tuple[int, str, str] | None = None  # (line, mark, reason) of a marker
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        fence = FENCE.match(line)
        if fence:
            ticks, lang = fence.groups()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(ticks):
                end += 1
            if end == len(lines):
                problems.append(f"line {i + 1}: code block is never closed")
            if not lang:
                problems.append(f"line {i + 1}: code block with no language: write ```bash or "
                                f"```python for a command, ```text for anything else")
            mark, reason = (pending[1], pending[2]) if pending else (None, "")
            if pending and lang not in RUN_LANGS:
                problems.append(f"line {pending[0]}: readme-test marker before a ```{lang} block, "
                                f"which never runs: remove the marker")
            blocks.append(Block(i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", section,
                                mark, reason))
            pending = None
            i = end + 1
            continue
        marker = MARKER.match(stripped)
        if marker:
            if pending:
                problems.append(f"line {pending[0]}: readme-test marker not followed by a "
                                f"code block")
            mark, reason = marker.groups()
            if mark not in MARKS or not reason:
                problems.append(f"line {i + 1}: readme-test marker must be "
                                f"'<!-- readme-test: skip|xfail: REASON -->', found {stripped!r}")
            pending = (i + 1, mark, reason)
        elif "readme-test" in stripped and stripped.startswith("<!--"):
            problems.append(f"line {i + 1}: malformed readme-test marker {stripped!r}: write "
                            f"'<!-- readme-test: skip|xfail: REASON -->'")
        elif stripped:
            if pending:
                problems.append(f"line {pending[0]}: readme-test marker not followed by a code "
                                f"block (line {i + 1} is text)")
                pending = None
            if line.startswith("## "):
                section = line[3:].strip()
        i += 1
    if pending:
        problems.append(f"line {pending[0]}: readme-test marker not followed by a code block")
    return blocks, problems


# ----------------------------------------------------------------------- rewriting shell lines

@dataclass
class Context:
    """What substitutions may use: ``port`` is the port of the server started last (each
    server gets a new one from ``new_port``, so a server still running from an earlier block
    never answers for a later one); the server log file; which substitutions fired."""
    new_port: Callable[[], int]
    port: int = 8000
    comment: str = ""  # the README's comment on the command being rewritten
    serve_log: str = ".readme-test/serve.log"
    used: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Substitution:
    """``rewrite(text, ctx) -> text`` applied where ``applies`` matches: to each shell command
    (one logical line, continuations joined, comment removed) and/or to a whole Python block,
    as ``langs`` says."""
    name: str
    applies: re.Pattern
    rewrite: Callable[[str, Context], str]
    reason: str
    langs: tuple[str, ...] = ("shell",)
    when: Callable[[Context], bool] = lambda ctx: True  # e.g. on the command's comment


def split_comment(command: str) -> tuple[str, str]:
    """(command, '# comment' or '') at the first unquoted '#' that starts a word."""
    quote = None
    for k, ch in enumerate(command):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or command[k - 1].isspace()):
            return command[:k].rstrip(), command[k:]
    return command.rstrip(), ""


def shell_commands(code: str) -> list[tuple[str, bool]]:
    """(text, is_command) pieces of a shell block: commands with their backslash continuations
    joined (the newlines kept), and heredoc bodies and blank/comment lines passed through."""
    out: list[tuple[str, bool]] = []
    lines = code.rstrip("\n").split("\n")
    i = 0
    while i < len(lines):
        text = lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
        stripped = text.strip()
        out.append((text, bool(stripped) and not stripped.startswith("#")))
        heredoc = HEREDOC.search(split_comment(text)[0])
        if heredoc:
            dash, _, word = heredoc.groups()
            while i + 1 < len(lines):
                i += 1
                out.append((lines[i], False))
                if (lines[i].lstrip("\t") if dash else lines[i]) == word:
                    break
        i += 1
    return out


def rewrite_shell(code: str, subs: list[Substitution], ctx: Context) -> str:
    pieces = []
    for text, is_command in shell_commands(code):
        if is_command:
            command, comment = split_comment(text)
            ctx.comment = comment
            for sub in subs:
                if "shell" in sub.langs and sub.applies.search(command) and sub.when(ctx):
                    command = sub.rewrite(command, ctx)
                    ctx.used.add(sub.name)
            text = command + (f"  {comment}" if comment else "")
        pieces.append(text)
    return "\n".join(pieces) + "\n"


def console_to_shell(code: str) -> str:
    """The '$ ' lines of a console block (the rest is output shown to the reader)."""
    return "".join(line[2:] + "\n" for line in code.split("\n") if line.startswith("$ "))


def rewrite_python(code: str, subs: list[Substitution], ctx: Context) -> str:
    for sub in subs:
        if "python" in sub.langs and sub.applies.search(code):
            code = sub.rewrite(code, ctx)
            ctx.used.add(sub.name)
    return code


# ----------------------------------------------------------------------- running

# Shell prelude: what a `numgpt serve ... &` line is rewritten to call after it starts, and
# what a command whose comment states its output is piped through.
PRELUDE = r"""
readme_test_expect() {  # TEXT: pass stdin through; fail unless it starts with TEXT
  local out; out=$(cat); printf '%s\n' "$out"
  [[ "$out" == "$1"* ]] && return 0
  echo "readme-test: printed '$out'; the README says '$1'" >&2; return 1
}
readme_test_server() {  # PID URL: remember the server, wait until /health answers 200
  echo "$1" >> .readme-test/servers
  for _ in $(seq 1200); do
    if ! kill -0 "$1" 2>/dev/null; then
      echo "readme-test: the server (pid $1) exited before /health answered; its log:" >&2
      cat .readme-test/serve.log >&2; return 1
    fi
    if curl -sf -o /dev/null "$2/health"; then return 0; fi
    sleep 0.1
  done
  echo "readme-test: $2/health did not answer within 120 s" >&2; return 1
}
"""


@dataclass
class Run:
    block: Block
    script: str
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def report(self) -> str:
        status = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        tail = lambda s: "\n".join(s.splitlines()[-25:])  # noqa: E731
        return (f"README block at line {self.block.line} ({self.block.lang}, section "
                f"{self.block.section!r}) failed: {status} after {self.seconds:.1f} s\n"
                f"--- script as run ---\n{self.script}--- stdout (last lines) ---\n"
                f"{tail(self.stdout)}\n--- stderr (last lines) ---\n{tail(self.stderr)}")


def block_env() -> dict[str, str]:
    """The environment blocks run in: this Python's scripts first on PATH (so `numgpt`,
    `python`, `mpiexec` and `lm_eval` are this install's), the Hugging Face libraries offline
    (nothing is ever downloaded), no API key inherited from the developer's shell."""
    env = dict(os.environ)
    env.pop("NUMGPT_API_KEY", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return env


def script_for(block: Block, subs: list[Substitution], ctx: Context) -> str:
    if block.kind == "python":
        return rewrite_python(block.code, subs, ctx)
    code = console_to_shell(block.code) if block.kind == "console" else block.code
    return rewrite_shell(code, subs, ctx)


def run_block(block: Block, sandbox: Path, subs: list[Substitution], ctx: Context,
              timeout: float) -> Run:
    """Run one block in ``sandbox`` (its own process group, killed whole on timeout)."""
    (sandbox / ".readme-test").mkdir(exist_ok=True)
    script = script_for(block, subs, ctx)
    if block.kind == "python":
        argv, stdin = [sys.executable, "-"], script
    else:
        path = sandbox / ".readme-test" / f"{block.id}.sh"
        path.write_text(PRELUDE + script)
        argv, stdin = ["bash", "-euo", "pipefail", str(path)], None
    # Output goes to files, not pipes: a process the block leaves running in the background
    # (a server) keeps its inherited stdout open, and waiting for a pipe's end would hang.
    out_path, err_path = (sandbox / ".readme-test" / f"{block.id}.{s}" for s in ("out", "err"))
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd=sandbox, env=block_env(), start_new_session=True,
                                stdin=subprocess.PIPE, stdout=out, stderr=err)
    try:
        proc.communicate(stdin.encode() if stdin else None, timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
    return Run(block, script, code, read(out_path), read(err_path), time.monotonic() - start)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie nobody has reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False


def stop_servers(sandbox: Path, grace: float = 15.0) -> None:
    """SIGTERM every server the blocks started (SIGKILL after ``grace`` seconds)."""
    listing = sandbox / ".readme-test" / "servers"
    if not listing.exists():
        return
    pids = [int(p) for p in listing.read_text().split()]
    listing.unlink()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


class Session:
    """Runs a file's blocks in order in one sandbox, each at most once; asking for block k
    first runs every runnable block before it (so ``-k`` selects one block and still gets the
    files earlier blocks make). Servers live until the first block of another section."""

    def __init__(self, blocks: list[Block], sandbox: Path, subs: list[Substitution],
                 ctx: Context, timeout: float):
        self.blocks, self.sandbox, self.subs, self.ctx, self.timeout = \
            blocks, sandbox, subs, ctx, timeout
        self.runs: dict[int, Run | None] = {}
        self.section: str | None = None

    def result(self, index: int) -> Run | None:
        for k in range(index + 1):
            if k not in self.runs:
                self.runs[k] = self._run(self.blocks[k])
        return self.runs[index]

    def _run(self, block: Block) -> Run | None:
        if block.kind is None or block.mark == "skip":
            return None
        if block.section != self.section:
            stop_servers(self.sandbox)
            self.section = block.section
        return run_block(block, self.sandbox, self.subs, self.ctx, self.timeout)

    def close(self) -> None:
        stop_servers(self.sandbox)
