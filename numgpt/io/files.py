"""Writing a file so that a crash never leaves it half written: the one ``atomic_write``.

The new content goes to a fresh temporary file in the target's folder, created with
``O_CREAT | O_EXCL`` under an unpredictable name (``tempfile.mkstemp``), so a symlink
planted at a predictable name is never followed; it is flushed and fsynced, then renamed
onto the target (``os.replace`` is atomic on POSIX). On any failure the temporary file is
removed and the old target is untouched. The temporary file gets the target's permission
bits if the target exists, else the usual ``0o666 & ~umask`` (``mkstemp`` alone would make
every file private, 0o600).

A write that fails because the disk is full or the folder is read-only is a ``WriteError``
(a ``NumGPTError`` and an ``OSError``) whose one line names the file, says the old file is
kept, and gives the fix; ``atomic_write`` and ``temp_path`` raise it, and other writers
wrap their writes in ``write_errors``.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..errors import CheckpointError, NumGPTError

__all__ = ["atomic_write", "temp_path", "fsync_path", "fsync_dir", "make_folder", "write_errors",
           "write_error", "WriteError", "TEMP_SUFFIX", "open_regular", "is_regular_file",
           "file_mode"]

TEMP_SUFFIX = ".tmp"
# errno values that mean "no room": the disk or quota is full, or a file-size limit was hit
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class WriteError(NumGPTError, OSError):
    """A file could not be written: the disk is full or the folder is read-only. Also an
    ``OSError`` (with the original ``errno``), so callers that catch ``OSError`` still do."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def write_error(exc: OSError, path, kept: str = "") -> OSError:
    """The ``WriteError`` an ``OSError`` from writing ``path`` means (disk full, read-only),
    or ``exc`` itself when it is neither. ``kept`` says what survived (e.g. the previous
    checkpoint), appended to the message."""
    if isinstance(exc, WriteError) or exc.errno not in DISK_FULL | READ_ONLY:
        return exc
    kept = f"; {kept}" if kept else ""
    if exc.errno in DISK_FULL:
        text = (f"disk full writing {str(path)!r} ({exc.strerror}){kept}; free space on that "
                f"disk (or raise the file-size limit) or write somewhere else, then run again")
    else:
        text = (f"cannot write {str(path)!r}: {exc.strerror} (the folder is read-only or not "
                f"yours){kept}; choose a writable folder or fix its permissions")
    return WriteError(exc.errno, text)


@contextmanager
def write_errors(path, kept: str = "") -> Iterator[None]:
    """Turn a disk-full or read-only ``OSError`` inside the block into a ``WriteError``."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, path, kept) from None


def make_folder(path, what: str = "the output") -> Path:
    """``mkdir -p path`` with a ``WriteError`` (not a traceback) when the parent is read-only."""
    path = Path(path)
    with write_errors(path, f"nothing was written; {what} needs a writable folder"):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def file_mode(target) -> int:
    """The permission bits a file written at ``target`` gets: the previous file's, else
    ``0o666 & ~umask`` (what ``open(..., "w")`` would give)."""
    target = Path(target)
    return target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()


def _new_temp(target: Path) -> tuple[int, Path]:
    """An exclusively created ``.NAME.<random>.tmp`` beside ``target``, open for writing,
    with the permission bits the finished file should have."""
    with write_errors(target, "nothing was written"):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, file_mode(target))
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


def fsync_dir(folder) -> None:
    """Flush a folder's entries (the renames just made in it), so that after a power cut the
    folder shows the new files, not the old ones. A no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder: the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[BinaryIO], None] | bytes | str, *,
                 fsync: bool = True) -> Path:
    """Replace ``path`` with what ``write(file)`` writes (or with the given bytes / UTF-8 str).

    ``write`` receives a binary file object opened on the temporary file. A full disk or a
    read-only folder raises ``WriteError``; the old file is kept either way."""
    path = Path(path)
    fd, tmp = _new_temp(path)
    try:
        with write_errors(path, f"the previous {path.name}, if any, is kept"), \
                os.fdopen(fd, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode("utf-8"))
            elif isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        with write_errors(path, f"the previous {path.name}, if any, is kept"):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_regular_file(path) -> bool:
    """True for a regular file (or a symlink to one); False for a FIFO, socket, device,
    folder, or nothing. ``Path.is_file`` says the same; this one never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path, what: str = "file"):
    """``open(path, "rb")`` for a model file from anywhere, refusing in one line
    (``CheckpointError``) anything but a regular file: opening a FIFO named like a checkpoint
    would block forever, a device would never end. The file is opened non-blocking, checked
    with ``fstat`` on the open descriptor (no window for a swap), then read normally.
    ``FileNotFoundError`` and other ``OSError`` pass through for the caller to word."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device" if
                    stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise CheckpointError(f"{path}: the {what} is {kind}, not a regular file; numgpt "
                                  f"reads models only from regular files (check the path)")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
