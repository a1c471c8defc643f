"""Shared test fixtures.

Test data (tinyshakespeare) lives OUTSIDE the repo in ``../shared/data`` (or wherever
``NUMGPT_SHARED_DATA`` points) and is never copied in; tests that need it skip with the
reason when it is absent. The GPT-2 BPE files ship inside the package (``numgpt/io/gpt2/``),
so no test skips for want of them.
"""

import os
from pathlib import Path

import pytest

from numgpt.core import gemm

# oneMKL (where installed) loads before any test module imports torch: libmkl_rt resolves its
# parts in the process's global symbols, where torch's copy of MKL would win and give wrong
# products (core/gemm.py's probe refuses that case); tests/test_gemm_gates.py uses it.
gemm.available()
# The suite runs on NumPy's OpenBLAS unless NUMGPT_GEMM says otherwise (NUMGPT_GEMM=mkl pytest
# runs all of it on oneMKL), the same on every machine whatever `numgpt compile` recorded there;
# tests/test_gemm_gates.py reruns every gate on oneMKL. It also keeps `numgpt compile` in the
# tests from recording a busy machine's timings as its --gemm auto choice.
os.environ.setdefault(gemm.ENV, "openblas")


def shared_data_dir() -> Path:
    """``$NUMGPT_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("NUMGPT_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """Folder with the real GPT-2 ``vocab.json`` + ``merges.txt``: the copy that ships in the
    package (``numgpt/io/gpt2/``; tests/test_tokenizer.py checks it is byte-identical to
    ``../shared/data/gpt2`` where that exists), else the shared one."""
    from numgpt.io.tokenizer import PACKAGED_GPT2

    names = ("vocab.json", "merges.txt")
    for folder in (PACKAGED_GPT2, shared_data_dir() / "gpt2"):
        if all((folder / n).is_file() for n in names):
            return folder
    pytest.skip(f"GPT-2 tokenizer files {list(names)} are neither in the package ({PACKAGED_GPT2}, "
                f"a broken checkout) nor in {shared_data_dir() / 'gpt2'}")


@pytest.fixture(scope="session")
def custom_bpe_dir(gpt2_tokenizer_dir, tmp_path_factory) -> Path:
    """A valid BPE folder that is NOT GPT-2's: GPT-2's first 1000 merges, then <|endoftext|>
    (id 1256). numgpt records it by its files, never by the name "gpt2"."""
    import json

    vocab = json.loads((gpt2_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [m for m in (gpt2_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
              if m and not m.startswith("#version")][:1000]
    kept = {t: i for t, i in vocab.items() if i < 256 + len(merges)}
    kept["<|endoftext|>"] = 256 + len(merges)
    folder = tmp_path_factory.mktemp("custom_bpe")
    (folder / "vocab.json").write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
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
