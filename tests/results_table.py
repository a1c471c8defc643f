"""One writer for the results tables that several test modules fill (docs/results/*.md).

Each table is a Markdown table whose first column is the case name. ``record(table, case,
*cells)`` replaces that case's row, keeps every other row already in the file (another
module, or another pytest process, may have written them) and rewrites the file atomically
(``numgpt.io.files.atomic_write``) under an exclusive lock on the results folder, so two
writers at once cannot lose each other's rows. Rows are kept sorted by case name. A table's
title, introduction and columns live here, once, in ``TABLES``.

Where results go is chosen once per pytest session (``tests/conftest.py``): ``results_dir()``
is ``docs/results/`` only under ``python -m pytest --write-results``; otherwise it is a
temporary folder of the session, so a plain test run still writes and checks every table and
screenshot but leaves the tracked files alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from numgpt.io.files import atomic_write

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"  # the tracked tables

_session_dir: Path | None = None  # set by configure(); None until then


def configure(folder: Path) -> None:
    """Make ``folder`` this session's results folder (conftest: RESULTS or a temporary one)."""
    global _session_dir
    _session_dir = Path(folder)


def results_dir() -> Path:
    """The folder this session writes results tables and screenshots into (created).

    Outside a configured pytest session (a module imported on its own) it is a fresh
    temporary folder, never ``docs/results/``: writing the tracked tables is always asked for.
    """
    global _session_dir
    if _session_dir is None:
        _session_dir = Path(tempfile.mkdtemp(prefix="numgpt-results-"))
    _session_dir.mkdir(parents=True, exist_ok=True)
    return _session_dir

# file name -> (title, introduction, column names)
TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "eval_parity.md": (
        "Perplexity and LAMBADA vs the course's protocol and transformers",
        "Written by `tests/test_evaluate.py` and `tests/test_lm_eval.py` through "
        "`tests/results_table.py`. Course-protocol rows: numgpt (value) vs the oracle, the "
        "course's loop run with torch on the same small random-weight float64 "
        "GPT2LMHeadModel. lm-eval rows: lm-evaluation-harness `local-completions` against "
        "`numgpt serve` vs `numgpt eval` / `numgpt generate` on the same model and file. "
        "Relative gate per row.",
        ("case", "numgpt vs reference", "gate", "result")),
    "inspect_parity.md": (
        "Look inside: hook points and inspect tools vs TransformerLens",
        "Written by `tests/test_hooks.py` and `tests/test_inspect.py` through "
        "`tests/results_table.py`. Each row runs numgpt and TransformerLens 4.x's "
        "`TransformerBridge` (raw numerics) on one random-weight GPT-2 folder written with "
        "`save_pretrained` and compares them (max abs difference); negative-control rows "
        "must FAIL the gate to PASS.",
        ("case", "max abs diff vs TransformerLens", "gate", "result")),
    "faults.md": (
        "Fault table: what numgpt survives",
        "Written by the fault tests (`tests/test_faults.py`, `tests/test_faults_serve.py`) through "
        "`tests/results_table.py`, one row per case, each run against the real command or "
        "a real subprocess server. The `20 fuzz` rows are the fuzz suite (`tests/test_fuzz.py`): "
        "one row per target, hypothesis examples each loaded in a process of its own under an "
        "address-space limit, or sent to an in-process server.",
        ("case", "what happens", "expected", "result")),
}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _key(line: str) -> str | None:
    """The case name of a table row (its first cell, still escaped), None for other lines."""
    if not line.startswith("| ") or line.startswith("|---"):
        return None
    i, n = 2, len(line)
    while i < n:  # the first " |" not preceded by a backslash ends the first cell
        if line[i] == "|" and line[i - 1] != "\\":
            return line[2:i].rstrip()
        i += 1
    return None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_rows(table: str, folder: Path | None = None) -> dict[str, str]:
    """The rows now in ``folder/table`` (default ``results_dir()``): case -> the whole line."""
    path = (results_dir() if folder is None else folder) / table
    if not path.exists():
        return {}
    title, intro, columns = TABLES[table]
    header = "| " + " | ".join(columns) + " |"
    rows, in_table = {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line == header:
            in_table = True
            continue
        key = _key(line) if in_table else None
        if key is not None:
            rows[key] = line
    return rows


def record(table: str, case: str, *cells: str, folder: Path | None = None) -> None:
    """Set the row of ``case`` in ``folder/table`` (one of ``TABLES``; default folder
    ``results_dir()``) to ``cells``."""
    folder = results_dir() if folder is None else folder
    title, intro, columns = TABLES[table]
    if len(cells) != len(columns) - 1:
        raise ValueError(f"{table} has columns {columns}; got {len(cells)} cells after the case")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        rows = read_rows(table, folder)
        rows[_cell(case)] = "| " + " | ".join(_cell(c) for c in (case, *cells)) + " |"
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        atomic_write(folder / table, f"# {title}\n\n{intro}\n\n{header}"
                     + "\n".join(rows[k] for k in sorted(rows)) + "\n")


def git_status(repo: Path) -> str | None:
    """``git status --porcelain`` of ``repo`` (untracked files listed one by one), each line
    followed by a hash of the file's bytes, so a file that was already changed and changes
    again shows too; None where git or the .git folder is absent."""
    if shutil.which("git") is None or not (repo / ".git").exists():
        return None
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    lines = []
    for line in done.stdout.splitlines():
        path = repo / line[3:].split(" -> ")[-1].strip('"')
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.is_file() else "-"
        lines.append(f"{line} {digest}")
    return "\n".join(lines)


def tree_changes(before: str, after: str) -> list[str]:
    """The ``git status --porcelain`` lines in ``after`` that ``before`` did not have, and
    those that went away: what a test run changed in the working tree."""
    old, new = set(before.splitlines()), set(after.splitlines())
    return sorted(f"new: {line}" for line in new - old) + sorted(f"gone: {line}" for line in old - new)
