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
