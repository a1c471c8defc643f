"""Where the fast path's compiled kernels are cached, and the note a cold cache gets.

numba caches beside the source (``numgpt/core/__pycache__``); a read-only package would
compile every kernel again in every process, so the cache then moves to the user's cache
folder through ``NUMBA_CACHE_DIR`` (``numgpt.core.threads.kernel_cache_dir``). A command
about to compile from a cold cache says so on stderr first; ``numgpt compile`` does it ahead.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from numgpt import cli
from numgpt.core import threads

TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


@pytest.fixture
def no_cache_env(monkeypatch):
    """NUMBA_CACHE_DIR unset, and unset again afterwards even if kernel_cache_dir set it
    (monkeypatch restores a variable only once it has set it)."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", "unset-after-the-test")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    return monkeypatch


def test_a_writable_package_caches_beside_the_source(tmp_path, no_cache_env):
    assert threads.kernel_cache_dir(tmp_path) == tmp_path / "__pycache__"
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_a_read_only_package_caches_in_xdg_cache_home(tmp_path, no_cache_env):
    real = os.access
    no_cache_env.setattr(os, "access", lambda p, mode, **k: False if mode == os.W_OK
                         and str(p).startswith(str(tmp_path / "pkg")) else real(p, mode, **k))
    no_cache_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    chosen = threads.kernel_cache_dir(tmp_path / "pkg")
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "xdg" / "numgpt" / "numba")
    assert chosen.parent == tmp_path / "xdg" / "numgpt" / "numba"
    assert chosen.name.startswith("core_")  # numba's subfolder for numgpt/core/*.py


def test_without_xdg_the_user_cache_is_under_home(tmp_path, no_cache_env):
    no_cache_env.delenv("XDG_CACHE_HOME", raising=False)
    no_cache_env.setenv("HOME", str(tmp_path))
    assert threads.user_cache_dir() == tmp_path / ".cache" / "numgpt" / "numba"


def test_the_users_numba_cache_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert threads.kernel_cache_dir().parent == tmp_path


def test_cold_until_an_index_newer_than_kernels_py_exists(tmp_path, monkeypatch):
    """Negative cases both ways: an empty folder and a stale index are cold, a fresh one warm."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    folder = threads.kernel_cache_dir()
    assert threads.kernel_cache_is_cold()
    folder.mkdir(parents=True)
    index = folder / f"kernels.gelu_forward_fit-400.{TAG}.nbi"
    index.write_bytes(b"x")
    old = threads.KERNELS_PY.stat().st_mtime - 60
    os.utime(index, (old, old))
    assert threads.kernel_cache_is_cold()  # written before kernels.py last changed
    now = time.time()
    os.utime(index, (now, now))
    assert not threads.kernel_cache_is_cold()
    (folder / f"kernels.gelu_forward_fit-400.py20.nbi").write_bytes(b"x")  # another Python
    index.unlink()
    assert threads.kernel_cache_is_cold()


def test_numba_caches_in_the_chosen_folder_when_the_package_is_read_only(tmp_path):
    """A fresh interpreter in which the package folder reads as not writable compiles a kernel
    into $XDG_CACHE_HOME/numgpt/numba, not beside the source."""
    code = ("import os\n"
            "real = os.access\n"
            "os.access = lambda p, m, **k: False if m == os.W_OK and 'numgpt' in str(p) "
            "and 'xdg' not in str(p) else real(p, m, **k)\n"
            "import numgpt, numpy as np\n"
            "from numgpt.core import kernels\n"
            "kernels.gelu(np.ones(3, np.float32))\n"
            "print(kernels.CACHE_DIR)\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    chosen = Path(done.stdout.strip())
    assert chosen.parent == tmp_path / "xdg" / "numgpt" / "numba"
    assert list(chosen.glob(f"kernels.gelu_forward_fit*.{TAG}.nbi")), sorted(chosen.rglob("*"))


def _note(argv, capsys) -> str:
    cli._note_cold_kernel_cache(cli.build_parser().parse_args(argv))
    return capsys.readouterr().err


def test_a_cold_cache_gets_a_one_line_note_before_a_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    note = _note(["generate", "--model", "m", "--prompt", "p"], capsys)
    assert note.startswith("numgpt: compiling kernels (first run only") and note.count("\n") == 1
    assert str(tmp_path) in note
    assert _note(["gradcheck", "--path", "reference"], capsys) == ""  # no kernels run
    assert _note(["info", "m"], capsys) == ""
    assert _note(["trace", "--reference-hf", "m", "--prompt", "p", "--out", "t.npz"], capsys) == ""
    assert _note(["trace", "--model", "m", "--prompt", "p", "--out", "t.npz"], capsys) != ""
    folder = threads.kernel_cache_dir()
    folder.mkdir(parents=True)
    (folder / f"kernels.gelu_forward_fit-400.{TAG}.nbi").write_bytes(b"x")
    assert _note(["generate", "--model", "m", "--prompt", "p"], capsys) == ""  # warm


def test_compile_command_names_what_it_compiled_and_where(capsys):
    assert "NUMBA_CACHE_DIR" not in os.environ or "xdg" not in os.environ["NUMBA_CACHE_DIR"]
    assert cli.main(["compile"]) == 0
    out = capsys.readouterr().out
    assert "layernorm_forward_serial" in out and "cached_attention_kernel" in out
    last = out.strip().splitlines()[-1]
    assert f"cache {threads.kernel_cache_dir()}" in last and " s; " in last
    assert not threads.kernel_cache_is_cold()


def test_compile_counts_what_it_compiled_from_the_index_files_numba_wrote(capsys):
    """It said 'loaded from the cache' right after kernels.py changed while it compiled (the
    guess came from before the run); the count now comes from the index files written."""
    import subprocess
    import sys

    def compile_in_a_fresh_process() -> str:  # in-process dispatchers never compile twice
        run = subprocess.run([sys.executable, "-m", "numgpt", "compile"], capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip().splitlines()[-1]

    compile_in_a_fresh_process()  # warm now, whatever it was
    assert "; 0 kernels compiled, " in compile_in_a_fresh_process()
    stamps = threads.kernel_index_stamps()
    victim = max((n for n in stamps if "gelu" in n), key=stamps.get)  # a current index file
    (threads.kernel_cache_dir() / victim).unlink()  # numba must compile that kernel again
    last = compile_in_a_fresh_process()
    assert "; 0 kernels compiled, " not in last and " kernels compiled, " in last
