"""Shared test fixtures.

Test data (GPT-2 BPE files, tinyshakespeare) lives OUTSIDE the repo in ``../shared/data``
(or wherever ``NUMGPT_SHARED_DATA`` points) and is never copied in; tests that need it
skip with the reason when it is absent.
"""

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """``$NUMGPT_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("NUMGPT_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """Folder with the real GPT-2 ``vocab.json`` + ``merges.txt``."""
    folder = shared_data_dir() / "gpt2"
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing:
        pytest.skip(f"GPT-2 tokenizer files {missing} not found in {folder} "
                    f"(set NUMGPT_SHARED_DATA to the folder holding gpt2/)")
    return folder


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Path to ``tinyshakespeare.txt`` (about 1.1 MB of ASCII text)."""
    path = shared_data_dir() / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (set NUMGPT_SHARED_DATA to the folder holding it)")
    return path


# -- results tables: written into docs/results/ only when asked (python -m pytest --write-results)

import shutil  # noqa: E402
import tempfile  # noqa: E402

import results_table  # noqa: E402  (tests/results_table.py)

REPO = Path(__file__).resolve().parents[1]
LAST_TEST = "test_results_clean.py::test_test_run_leaves_the_git_tree_as_it_found_it"


def pytest_addoption(parser):
    parser.addoption("--write-results", action="store_true", default=False,
                     help="write the results tables and screenshots into docs/results/ "
                          "(default: a temporary folder of the session; the tables are "
                          "written and checked either way)")
    parser.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                     help="tests/test_fuzz.py: N generated examples per fuzz target instead "
                          "of the default suite's small budget (the issue's cases run either way)")


def pytest_configure(config):
    if config.getoption("--write-results"):
        results_table.configure(results_table.RESULTS)
    else:
        folder = Path(tempfile.mkdtemp(prefix="numgpt-results-"))
        config._numgpt_results_tmp = folder
        results_table.configure(folder)


def pytest_unconfigure(config):
    folder = getattr(config, "_numgpt_results_tmp", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_sessionstart(session):
    # compared by tests/test_results_clean.py, which runs last
    session.config._numgpt_git_status = results_table.git_status(REPO)


def pytest_collection_modifyitems(session, config, items):
    """The clean-tree check runs last, after every test that could have written a file."""
    last = [item for item in items if item.nodeid.endswith(LAST_TEST)]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """The folder this session writes results into (``results_table.results_dir()``)."""
    return results_table.results_dir()
