"""What a crash leaves in a folder, and how the next run of that folder tidies it up.

A numgpt checkpoint is one atomic unit: its ``.safetensors`` file carries, in its header
metadata (``numgpt_doc``), the whole document that ``.json`` holds. A save writes both
files under fresh temporary names, fsyncs them, then renames the weights file into place
(the commit point: one ``os.replace``) and the ``.json`` copy after it. So after a crash at
any instant the weights file on disk is either the old complete save or the new complete
one, and a ``.json`` that is missing, or names another ``save_id`` than the weights, is a
stale copy that the weights' own document replaces.

Two things can be left behind: the temporaries of the interrupted save (``.NAME.<random>.tmp``,
see ``io.files``) and a stale ``.json``. ``tidy_folder`` removes the first and rewrites the
second; ``numgpt train`` runs it on its run folder before anything reads it. It also removes
the ``.tmpXXXXXX`` files that the safetensors library's own ``save_file`` leaves when killed
(numgpt versions before it wrote safetensors files itself used it). Files are only ever
opened after ``fstat`` shows a regular file (``io.files.open_regular``): a FIFO named like a
checkpoint would block forever. Pure Python (no NumPy): the CLI runs it before the BLAS
thread count is set.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError
from .files import TEMP_SUFFIX, atomic_write, open_regular

__all__ = ["weights_doc", "recover_checkpoint", "remove_orphans", "tidy_folder", "DOC_KEY"]

DOC_KEY = "numgpt_doc"  # safetensors metadata key holding the checkpoint's JSON document
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size
# the temporaries io.files creates: "." + target name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# the temporaries of the safetensors library's save_file (Rust tempfile: ".tmp" + 6 characters)
_LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def weights_doc(weights: Path) -> dict | None:
    """The checkpoint document stored inside a numgpt ``.safetensors`` header, or None when
    the file is absent, unreadable, or older than this scheme (the loader reports why)."""
    try:
        with open_regular(weights, "weights file") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                return None
            header = json.loads(f.read(n))
        doc = json.loads(header["__metadata__"][DOC_KEY])
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None
    return doc if isinstance(doc, dict) else None


def _json_save_id(path: Path) -> str | None:
    try:
        with open_regular(path, "checkpoint document") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, CheckpointError):
        return None
    return doc.get("save_id") if isinstance(doc, dict) else None


def recover_checkpoint(prefix: Path) -> str | None:
    """Rewrite ``prefix.json`` from the weights file's own document when it is missing or
    from another save (a crash between the two renames). Returns a note saying so, or None
    when there was nothing to do. A ``.json`` that is not valid JSON is left for the loader
    to report: numgpt's own saves never leave one."""
    prefix = Path(prefix)
    weights, config = (prefix.with_name(prefix.name + s) for s in (".safetensors", ".json"))
    doc = weights_doc(weights)
    if doc is None:
        return None
    found = None
    if config.exists():
        found = _json_save_id(config)
        if found is None or found == doc.get("save_id"):
            return None
    atomic_write(config, json.dumps(doc, indent=2) + "\n")
    return (f"{config} was {'stale' if found else 'missing'} (a save interrupted between its "
            f"two renames); rewritten from {weights.name}, the complete newer save")


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporaries an interrupted write left in ``folder``; returns them."""
    removed = []
    for p in Path(folder).iterdir():
        ours = _TEMP_NAME.fullmatch(p.name) or _LIBRARY_TEMP.fullmatch(p.name)
        if ours and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def tidy_folder(folder: Path, prefixes=("latest", "best")) -> list[str]:
    """Make a run folder whole after a crash: orphaned temporaries removed, stale ``.json``
    copies of the checkpoints ``prefixes`` rewritten. Returns one note per repair."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    notes = [f"removed {p.name}, left by an interrupted write" for p in remove_orphans(folder)]
    for name in prefixes:
        note = recover_checkpoint(folder / name)
        if note:
            notes.append(note)
    return notes
