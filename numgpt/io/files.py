"""Writing a file so that a crash never leaves it half written: the one ``atomic_write``.

The new content goes to a fresh temporary file in the target's folder, created with
``O_CREAT | O_EXCL`` under an unpredictable name (``tempfile.mkstemp``), so a symlink
planted at a predictable name is never followed; it is flushed and fsynced, then renamed
onto the target (``os.replace`` is atomic on POSIX). On any failure the temporary file is
removed and the old target is untouched. The temporary file gets the target's permission
bits if the target exists, else the usual ``0o666 & ~umask`` (``mkstemp`` alone would make
every file private, 0o600).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "temp_path", "fsync_path", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _new_temp(target: Path) -> tuple[int, Path]:
    """An exclusively created ``.NAME.<random>.tmp`` beside ``target``, open for writing,
    with the permission bits the finished file should have."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    try:
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


def temp_path(target) -> Path:
    """A new, empty, exclusively created temporary file beside ``target`` (for writers that
    take a path, such as safetensors); the caller renames it into place or removes it."""
    fd, tmp = _new_temp(Path(target))
    os.close(fd)
    return tmp


def fsync_path(path) -> None:
    """Flush a finished file's data to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[BinaryIO], None] | bytes | str, *,
                 fsync: bool = True) -> Path:
    """Replace ``path`` with what ``write(file)`` writes (or with the given bytes / UTF-8 str).

    ``write`` receives a binary file object opened on the temporary file."""
    path = Path(path)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode("utf-8"))
            elif isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
