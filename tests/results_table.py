"""One writer for the results tables that several test modules fill (docs/results/*.md).

Each table is a Markdown table whose first column is the case name. ``record(table, case,
*cells)`` replaces that case's row, keeps every other row already in the file (another
module, or another pytest process, may have written them) and rewrites the file atomically
(``numgpt.io.files.atomic_write``) under an exclusive lock on the results folder, so two
writers at once cannot lose each other's rows. Rows are kept sorted by case name. A table's
title, introduction and columns live here, once, in ``TABLES``.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from numgpt.io.files import atomic_write

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"

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
    "faults.md": (
        "Fault table: what numgpt survives",
        "Written by the fault tests (`tests/test_faults.py`, `tests/test_faults_serve.py`) through "
        "`tests/results_table.py`, one row per case, each run against the real command or "
        "a real subprocess server.",
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


def read_rows(table: str, folder: Path = RESULTS) -> dict[str, str]:
    """The rows now in ``folder/table``: case name (escaped) -> the whole Markdown line."""
    path = folder / table
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


def record(table: str, case: str, *cells: str, folder: Path = RESULTS) -> None:
    """Set the row of ``case`` in ``folder/table`` (one of ``TABLES``) to ``cells``."""
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
