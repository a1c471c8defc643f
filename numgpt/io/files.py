"""Writing a file so that a crash never leaves it half written: the one ``atomic_write``.

The new content goes to a fresh temporary file in the target's folder, created with
``O_CREAT | O_EXCL`` under an unpredictable name (``tempfile.mkstemp``), so a symlink
planted at a predictable name is never followed; it is flushed and fsynced, then renamed
onto the target (``os.replace`` is atomic on POSIX). On any failure the temporary file is
removed and the old target is untouched.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "temp_path", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def temp_path(target: Path) -> Path:
    """A new, empty, exclusively created file beside ``target``: ``.NAME.<random>.tmp``."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def atomic_write(path, write: Callable[[BinaryIO], None] | bytes | str, *,
                 fsync: bool = True) -> Path:
    """Replace ``path`` with what ``write(file)`` writes (or with the given bytes/str).

    ``write`` receives a binary file object opened on the temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
