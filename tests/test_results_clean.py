"""A plain test run leaves the git working tree as it found it.

Results tables and screenshots go to a temporary folder unless ``--write-results`` is given
(``tests/results_table.py``). ``tests/conftest.py`` records ``git status`` when the session
starts and orders the last test here after every other one; it compares the two.
"""

import subprocess
from pathlib import Path

import pytest

import results_table  # tests/results_table.py

REPO = Path(__file__).resolve().parents[1]


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder,
                   check=True, capture_output=True)


def test_results_dir_is_a_temporary_folder_without_write_results(request):
    folder = results_table.results_dir()
    assert folder == request.getfixturevalue("results_dir")
    if request.config.getoption("--write-results"):
        assert folder == results_table.RESULTS
    else:
        assert folder.resolve() != results_table.RESULTS.resolve()
        assert REPO not in folder.resolve().parents


def test_record_defaults_to_the_session_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(results_table, "_session_dir", tmp_path)
    results_table.record("faults.md", "probe", "x", "y", "PASS")
    assert results_table.read_rows("faults.md") == {"probe": "| probe | x | y | PASS |"}
    assert "| probe | x | y | PASS |" in (tmp_path / "faults.md").read_text()


def test_tree_changes_sees_a_planted_write_in_a_git_repo(tmp_path):
    """Negative case: a write into a tracked file, a new file, and a second write into a file
    that was already modified are each reported; an untouched tree reports nothing."""
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    _git(tmp_path, "init", "-q")
    (tmp_path / "table.md").write_text("| a | 1 |\n")
    (tmp_path / "dirty.md").write_text("one\n")
    _git(tmp_path, "add", "table.md", "dirty.md")
    _git(tmp_path, "commit", "-q", "-m", "x")
    (tmp_path / "dirty.md").write_text("two\n")  # already modified before the "run"
    before = results_table.git_status(tmp_path)
    assert results_table.tree_changes(before, results_table.git_status(tmp_path)) == []
    (tmp_path / "table.md").write_text("| a | 2 |\n")
    (tmp_path / "dirty.md").write_text("three\n")
    (tmp_path / "shot.png").write_bytes(b"\x89PNG")
    changes = results_table.tree_changes(before, results_table.git_status(tmp_path))
    assert any(c.startswith("new:") and "table.md" in c for c in changes)
    assert any(c.startswith("new:") and "dirty.md" in c for c in changes)
    assert any(c.startswith("new:") and "shot.png" in c for c in changes)


def test_git_status_is_none_without_a_git_folder(tmp_path):
    assert results_table.git_status(tmp_path) is None


def test_test_run_leaves_the_git_tree_as_it_found_it(request):
    """Ordered last by tests/conftest.py: every test has run when this compares."""
    if request.config.getoption("--write-results"):
        pytest.skip("--write-results rewrites docs/results/ on purpose")
    before = request.config._numgpt_git_status
    if before is None:
        pytest.skip("git or the repository's .git folder is absent: nothing to compare")
    changes = results_table.tree_changes(before, results_table.git_status(REPO))
    assert changes == [], ("the test run changed the working tree (a test wrote into the "
                           "repository; results belong in results_table.results_dir()):\n"
                           + "\n".join(changes))
