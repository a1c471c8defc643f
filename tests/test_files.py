"""``numgpt.io.files.atomic_write``: the one way numgpt replaces a file."""
import os
import stat

import pytest

from numgpt.io.files import TEMP_SUFFIX, atomic_write, temp_path


def _temps(folder):
    return [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_writes_text_bytes_and_callbacks(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo\n")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "c.bin", lambda f: f.write(b"xyz"))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"xyz"
    assert _temps(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert _temps(tmp_path) == []


def test_a_planted_symlink_at_the_old_temporary_name_is_not_followed(tmp_path):
    """The temporary name is unpredictable and created with O_EXCL: a symlink planted at
    the name older numgpt used (.NAME.tmp) is left alone, and so is its target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / ".log.jsonl.tmp")
    atomic_write(tmp_path / "log.jsonl", "new\n")
    assert victim.read_text() == "precious"
    assert (tmp_path / "log.jsonl").read_text() == "new\n"


def test_new_files_get_the_umask_mode_and_replacements_keep_the_old_mode(tmp_path):
    fresh = atomic_write(tmp_path / "fresh.txt", "x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_current_umask()
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    atomic_write(kept, "y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_temp_path_is_exclusive_and_beside_the_target(tmp_path):
    a, b = temp_path(tmp_path / "w.safetensors"), temp_path(tmp_path / "w.safetensors")
    assert a != b and a.parent == tmp_path and a.exists() and a.name.startswith(".w.safetensors.")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_open_regular_refuses_a_fifo_and_a_folder_without_waiting(tmp_path):
    """A FIFO named like a model file would block ``open`` forever (nothing writes to it):
    ``open_regular`` opens non-blocking and refuses it in one line; a folder too."""
    from numgpt.errors import CheckpointError
    from numgpt.io.files import is_regular_file, open_regular

    fifo = tmp_path / "latest.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"latest\.safetensors: the weights file is a FIFO, "
                                              r"not a regular file"):
        open_regular(fifo, "weights file")
    with pytest.raises(CheckpointError, match="is a folder"):
        open_regular(tmp_path, "weights file")
    (tmp_path / "ok.bin").write_bytes(b"abc")
    with open_regular(tmp_path / "ok.bin") as f:
        assert f.read() == b"abc"
    assert is_regular_file(tmp_path / "ok.bin") and not is_regular_file(fifo)
    assert not is_regular_file(tmp_path / "missing") and not is_regular_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")
