"""Checkpoints: load every GPT-2 source a user has, save and export without pickle.

Three sources, told apart by what is on disk (``detect_format``):

* ``hf``: a Hugging Face GPT-2 folder, ``config.json`` + ``model.safetensors`` (or
  sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``, which needs torch).
  HF's ``Conv1D`` weights are already ``(in, out)``, like numgpt's ``Linear``.
* ``nanogpt``: a nanoGPT ``ckpt.pt`` (``model_args`` + ``model`` state dict, read with
  torch's ``weights_only=True``). Its ``nn.Linear`` weights are ``(out, in)``: transposed
  here, and only here.
* ``numgpt``: ``<prefix>.json`` (format, version, model config, tokenizer config: a name,
  or ``<prefix>.tokenizer/`` holding a copy of its files; caller's metadata) +
  ``<prefix>.safetensors`` (parameters by their numgpt names, plus optional extra arrays
  under ``extra/``, e.g. optimizer moments, and a copy of the ``.json`` document in its
  header). No pickle anywhere. A run folder of ``numgpt train`` is its ``best`` checkpoint
  (``resolve_run_folder``).

Every load checks, and names the file and key when it refuses: missing keys, unexpected
keys, shapes (expected vs found), truncated or corrupt files, non-GPT-2 architectures,
and an output head that is not tied to ``wte``. Sizes are checked against the config, and
the config against the machine's available memory, before the model is allocated; weights
that are NaN or infinite are refused (``check_finite=False`` skips that scan). A file
comes from strangers, so nothing is built in proportion to what it claims before that
claim is checked: the tensor count a config implies is compared by arithmetic first,
stored dtypes must be floats, and model files must be regular files (a FIFO would block
``open`` forever). GGUF files (``io.gguf``) go through the same ``_new_model`` /
``_new_quantized_model`` path, and so the same memory and finite checks.

A numgpt checkpoint is one atomic unit (``io.recovery``): both files are written under
fresh temporary names and fsynced; renaming the weights file into place is the commit, and
the ``.json`` (a readable copy of the document inside the weights' header) follows. The two
share a random ``save_id``: a ``.json`` from another save (a crash between the renames) or
a missing one is replaced by the weights' own document, so a crash at any instant leaves
the old complete save or the new one. ``save_hooks`` lets a test stop the process at each
named point of a save (``SAVE_POINTS``). A full disk or a read-only folder is a one-line
``WriteError`` and the previous checkpoint stays.

The loaded ``GPT`` carries ``model.config``, ``model.tokenizer`` (or None) and
``model.source`` (format, path, weights file, notes), which ``describe`` reports.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CheckpointError, ConfigError, NumGPTError
from .files import (fsync_dir, fsync_path, is_regular_file, make_folder, open_regular, temp_path,
                    write_errors)
from . import chat
from .recovery import DOC_KEY, weights_doc
from ..core import quant
from ..core.checks import is_int
from ..core.model import GPT, GPTConfig
from .tokenizer import (BPE_FILE_NAMES, ByteTokenizer, GPT2Tokenizer, load_tokenizer, save_files,
                        tokenizer_from_config)

__all__ = ["load", "save", "load_checkpoint", "export_hf", "detect_format", "resolve_run_folder",
           "RUN_CHECKPOINTS", "find_tokenizer",
           "describe", "check_memory", "available_memory", "FORMAT_NAME", "FORMAT_VERSION",
           "EXTRA_PREFIX", "SAVE_POINTS", "save_hooks"]

FORMAT_NAME = "numgpt-checkpoint"
FORMAT_VERSION = 1
EXTRA_PREFIX = "extra/"  # key prefix of caller arrays (optimizer moments...) in a numgpt file

# HF activation names whose math numgpt implements exactly (gelu_fast is the tanh form with
# sqrt(2/pi) written as 0.7978845608, equal to 1e-11 relative).
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu"}
_EXPORT_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# HF's GPT2Config defaults, used (as transformers does) for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                    layer_norm_epsilon=1e-5, activation_function="gelu_new", resid_pdrop=0.1)
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Non-parameter buffers some GPT-2 files carry: the causal mask and its fill value.
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# nanoGPT nn.Linear weights, stored (out, in): the only tensors an importer transposes.
_LINEAR_WEIGHT = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_NANOGPT_ARGS = {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float32", "BF16": "float32"}  # -> model dtype
_ST_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
             "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}

Thunk = Callable[[], np.ndarray]  # reads one tensor when called, so loads stream

# The named points of a numgpt save, in order. A test sets ``save_hooks[point] = fn`` and
# ``fn(prefix)`` runs there (tests/test_faults.py kills the process with SIGKILL to prove a
# crash at each point leaves a loadable checkpoint). Empty in normal use.
SAVE_POINTS = ("weights_written", "config_written", "weights_renamed", "config_renamed")
save_hooks: dict[str, Callable[[Path], None]] = {}


def _reached(point: str, prefix: Path) -> None:
    hook = save_hooks.get(point)
    if hook is not None:
        hook(prefix)


class _Stored:
    """One tensor in a file: ``shape`` and ``dtype`` (a numpy-style name: "float32",
    "bfloat16", "int64"...; from the header, known before anything is read; None when
    unknown) and its reader (calling the object reads the tensor)."""

    __slots__ = ("read", "shape", "dtype")

    def __init__(self, read: Thunk, shape=None, dtype: str | None = None):
        self.read, self.shape = read, None if shape is None else tuple(int(n) for n in shape)
        self.dtype = dtype

    def __call__(self) -> np.ndarray:
        return self.read()


# ------------------------------------------------------------------------ detection

def _prefix_of(path: Path) -> Path:
    """``run/model``, ``run/model.json`` and ``run/model.safetensors`` -> ``run/model``."""
    for suffix in (".json", ".safetensors"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _with(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


RUN_CHECKPOINTS = ("best", "latest")  # what a run folder (`numgpt train --out`) holds, in order


def resolve_run_folder(path: str | os.PathLike, *, announce: bool = True) -> Path:
    """A run folder (``numgpt train --out DIR``) means its ``best`` checkpoint, or ``latest``
    when no evaluation has saved a best yet (said in one line on stderr when ``announce``);
    any other path comes back unchanged."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file() or (p / "ckpt.pt").is_file():
        return p
    for name in RUN_CHECKPOINTS:
        prefix = p / name
        if _with(prefix, ".json").is_file() or _with(prefix, ".safetensors").is_file():
            if name != RUN_CHECKPOINTS[0] and announce:
                print(f"numgpt: note: {str(p)!r} has no {RUN_CHECKPOINTS[0]} checkpoint yet (no "
                      f"evaluation has finished); using {str(prefix)!r}", file=sys.stderr)
            return prefix
    return p


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """What kind of checkpoint ``path`` is: ``("hf", folder)``, ``("nanogpt", file)`` or
    ``("numgpt", prefix)`` (a run folder is its best checkpoint, ``resolve_run_folder``).
    CheckpointError (naming what was looked for) if none."""
    p = resolve_run_folder(path, announce=False)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p
        if (p / "ckpt.pt").is_file():
            return "nanogpt", p / "ckpt.pt"
        found = sorted(x.name for x in p.iterdir())[:12]
        raise CheckpointError(f"folder {str(p)!r} holds no checkpoint: expected config.json "
                              f"(Hugging Face), ckpt.pt (nanoGPT), or best.json / latest.json "
                              f"(a numgpt run folder); found {found or 'nothing'}")
    if p.name in (*_HF_WEIGHT_FILES, "config.json") and (p.parent / "config.json").is_file():
        return "hf", p.parent
    if p.name.endswith(".gguf"):
        return "gguf", p
    prefix = _prefix_of(p)
    if _with(prefix, ".json").is_file() or _with(prefix, ".safetensors").is_file():
        return "numgpt", prefix
    if p.is_file():
        return "nanogpt", p
    raise CheckpointError(f"no checkpoint at {str(p)!r}: expected a Hugging Face folder "
                          f"(config.json + model.safetensors), a nanoGPT ckpt.pt, or a numgpt "
                          f"checkpoint PREFIX.json + PREFIX.safetensors; check the path")


def _dtype_name(dtype) -> str | None:
    """None, 'float32', np.float64, np.dtype(...) -> 'float32' / 'float64' / None."""
    if dtype is None:
        return None
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    return name


# ----------------------------------------------------------------------- file reads

def _require_file(path: Path, what: str) -> None:
    """CheckpointError unless ``path`` is a regular file: missing, or a FIFO, folder or device
    named like one (``io.files.open_regular`` says which; opening a FIFO would hang)."""
    if not is_regular_file(path):
        if os.path.exists(path):
            open_regular(path, what).close()  # raises, naming what it is
        raise CheckpointError(f"missing {what} {str(path)!r}")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file, line and column if not."""
    _require_file(path, what)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {what}, not valid JSON ({e}); "
                              f"restore it from a good copy or re-export the checkpoint") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, found {type(doc).__name__}")
    return doc


def _open_safetensors(path: Path, stack: ExitStack):
    """A ``safe_open`` handle on ``path`` kept open by ``stack``; CheckpointError if unreadable.

    ``safe_open`` validates the header and that the data covers the file exactly, so a
    truncated or padded file is refused here, before any tensor is read.
    """
    from safetensors import safe_open

    _require_file(path, "weights file")
    try:
        return stack.enter_context(safe_open(str(path), framework="numpy"))
    except Exception as e:  # SafetensorError, OSError: the header or the file is broken
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated "
                              f"or corrupt: copy or export it again") from None


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors header ``{key: {dtype, shape, data_offsets}}`` and where data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_tensor(path: Path, entry: dict, data_start: int) -> np.ndarray:
    """One tensor read straight from the file (not through a memory map, whose pages would
    count against the process while the model is filled). BF16, which numpy lacks, is the
    top half of a float32, so it widens exactly with a 16-bit shift."""
    kind, shape = entry["dtype"], entry["shape"]
    begin, end = entry["data_offsets"]
    dtype = np.dtype("<u2" if kind == "BF16" else _ST_NUMPY[kind])
    a = np.fromfile(path, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=data_start + begin)
    if kind == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.reshape(shape)


def _safetensors_thunks(path: Path, stack: ExitStack, keys=None) -> tuple[dict[str, Thunk], str, dict]:
    """{key: reader} for the tensors of one safetensors file, its float dtype name, its metadata."""
    f = _open_safetensors(path, stack)
    header, data_start = _header(path)
    thunks, dtypes = {}, set()
    for key in (f.keys() if keys is None else keys):
        entry = header.get(key)
        if entry is None:  # a sharded index naming a tensor its shard does not hold
            raise CheckpointError(f"{path}: holds no tensor {key!r}, which the safetensors index "
                                  f"assigns to it; the index and the shard disagree")
        if entry["dtype"] not in _ST_NUMPY and entry["dtype"] != "BF16":
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which numgpt "
                                  f"cannot read; supported: {sorted(_ST_NUMPY) + ['BF16']}")
        dtypes.add(entry["dtype"])
        kind = "bfloat16" if entry["dtype"] == "BF16" else np.dtype(_ST_NUMPY[entry["dtype"]]).name
        thunks[key] = _Stored(lambda e=entry: _read_tensor(path, e, data_start), entry["shape"], kind)
    floats = [_ST_DTYPES[d] for d in dtypes if d in _ST_DTYPES]
    return thunks, ("float64" if "float64" in floats else "float32"), f.metadata() or {}


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch "
                              f"(pip install torch), or convert it to safetensors on a machine "
                              f"that has torch") from None
    return torch


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    torch = _import_torch(path)
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated, "
                              f"corrupt, or holds objects other than tensors") from None


def _torch_to_numpy(t, path: Path, key: str) -> np.ndarray:
    torch = _import_torch(path)
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: {key!r} is a {type(t).__name__}, expected a tensor")
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.numpy()


def _torch_kind(t) -> str | None:
    """A torch tensor's dtype as a numpy-style name ("float32", "bfloat16", "int64"), from
    its header, without reading it; None for anything that is not a tensor."""
    dtype = getattr(t, "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _torch_dtype(tensors: Mapping[str, Any]) -> str:
    import torch

    return "float64" if any(getattr(t, "dtype", None) == torch.float64
                            for t in tensors.values()) else "float32"


# --------------------------------------------------------------- names and filling

def _normalize(thunks: Mapping[str, Thunk], path: Path, strip: tuple[str, ...]) -> dict[str, Thunk]:
    """Strip known prefixes (``_orig_mod.``, ``transformer.``) and drop mask buffers."""
    out: dict[str, Thunk] = {}
    origin: dict[str, str] = {}
    for key, thunk in thunks.items():
        name = key
        for prefix in strip:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if _BUFFER.match(name):
            continue
        if name in out:
            raise CheckpointError(f"{path}: keys {origin[name]!r} and {key!r} both name "
                                  f"parameter {name!r}; the file is ambiguous")
        out[name], origin[name] = thunk, key
    return out


def _check_keys(expected: Mapping[str, Any], found: Mapping[str, Any], path: Path,
                config: GPTConfig) -> None:
    """Refuse missing and unexpected parameter names, listing them against the config."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shape = (f"n_layer={config.n_layer}, bias={config.bias}")
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} parameter(s) the config "
                              f"({shape}) needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected key(s) that are not GPT-2 "
                              f"parameters for this config ({shape}): "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def _shape(thunk) -> tuple[int, ...] | None:
    return getattr(thunk, "shape", None)


def _shape_mismatch(path: Path, name: str, expected, found, layout: str) -> CheckpointError:
    return CheckpointError(f"{path}: shape mismatch for {name!r}: expected {tuple(expected)}"
                           f"{layout}, found {tuple(found)}; the weights do not match the config")


def _check_stored_shapes(expected: Mapping[str, tuple], thunks: Mapping[str, Thunk], path: Path,
                         layout: str) -> None:
    """Shapes the file's header declares vs the config's, before the model is allocated."""
    for name, shape in expected.items():
        found = _shape(thunks[name])
        if found is not None and found != tuple(shape):
            raise _shape_mismatch(path, name, shape, found, layout)


def _check_dtypes(expected: Mapping[str, Any], thunks: Mapping[str, Thunk], path: Path) -> None:
    """Parameters are stored as floats, checked from the header before anything is read: an
    integer or bool tensor would otherwise be cast silently into weights."""
    for name in expected:
        kind = getattr(thunks[name], "dtype", None)
        if kind is not None and not _is_float(kind):
            raise _not_float(path, name, kind)


def _is_float(kind: str) -> bool:
    return kind in ("float16", "bfloat16", "float32", "float64")


def _not_float(path: Path, name: str, kind: str) -> CheckpointError:
    return CheckpointError(f"{path}: parameter {name!r} is stored as {kind}; GPT-2 weights are "
                           f"float16, bfloat16, float32 or float64: the file is corrupt or "
                           f"crafted (re-export it)")


def _check_count(config: GPTConfig, found: int, path: Path) -> None:
    """Refuse, by arithmetic alone, a config that names far more parameter tensors than the
    file holds (``n_layer: 10**12`` beside the weights of 2 layers) before any per-layer name
    is built: building them would take hours and gigabytes. Up to twice the file's count
    (plus a margin) the names are built and ``_check_keys`` lists the missing ones."""
    need = config.parameter_tensor_count()
    if need > 2 * found + 1024:
        raise CheckpointError(f"{path}: missing {need - found:,} parameter(s) the config "
                              f"(n_layer={config.n_layer}, bias={config.bias}) needs: it names "
                              f"{need:,} tensors and the file holds {found:,}")


def _label(read, key: str) -> str:
    """How a message names a stored tensor: its numgpt name, and the file's own name when the
    format uses another (a GGUF reader's ``source``, e.g. 'blk.1.ffn_up.weight')."""
    name, source = key.removesuffix(".q8_0"), getattr(read, "source", None)
    return repr(name) + (f" (the file's {source!r})" if source and source != name else "")


def _check_finite(a, label: str, path: Path) -> None:
    """Refuse NaN or infinite stored floats; a q8_0 matrix (``quant.Q8Matrix``) through its
    float16 block scales (its int8 codes are always finite). ``label``: see ``_label``."""
    if isinstance(a, quant.Q8Matrix):
        a, label = a.scales, f"{label}, its q8_0 block scales,"
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise CheckpointError(f"{path}: parameter {label} holds {bad} NaN or infinite value(s) of "
                              f"{a.size}; the checkpoint is damaged (e.g. saved after training "
                              f"diverged): use an earlier checkpoint, or load it anyway with "
                              f"check_finite=False (--skip-finite-check)")


def _fill(model: GPT, thunks: Mapping[str, Thunk], path: Path, layout: str = "",
          check_finite: bool = True) -> None:
    """Copy every parameter in, one tensor at a time (peak memory: model + one tensor)."""
    params = model.parameters()
    _check_keys(params, thunks, path, model.config)
    for name, p in params.items():
        a = thunks[name]()
        if a.shape != p.data.shape:
            raise _shape_mismatch(path, name, p.data.shape, a.shape, layout)
        if a.dtype.kind != "f":
            raise _not_float(path, name, a.dtype.name)
        if check_finite:
            _check_finite(a, _label(thunks[name], name), path)
        p.data[...] = a  # casts to the model's dtype


def _check_tied(head: Thunk | None, wte: Thunk, path: Path) -> None:
    """A separate ``lm_head.weight`` is accepted only if it equals ``wte`` exactly."""
    if head is None:
        return
    h, e = head(), wte()
    if h.shape != e.shape or not np.array_equal(h, e):
        diff = (f"max abs diff {float(np.max(np.abs(h.astype(np.float64) - e))):.3g}"
                if h.shape == e.shape else f"shape {tuple(h.shape)} vs {tuple(e.shape)}")
        raise CheckpointError(f"{path}: 'lm_head.weight' differs from 'wte.weight' ({diff}); "
                              f"numgpt ties the output head to the token embedding, so an "
                              f"untied head cannot be loaded without changing the model's outputs")


def _new_model(config: GPTConfig, thunks: dict[str, Thunk], path: Path, layout: str = "",
               check_finite: bool = True) -> GPT:
    """Names and header shapes checked against the config, and the config against the
    machine's memory, before the model is allocated; then filled tensor by tensor."""
    head = thunks.pop("lm_head.weight", None)
    _check_count(config, len(thunks), path)
    expected = config.parameter_shapes()
    _check_keys(expected, thunks, path, config)
    _check_stored_shapes(expected, thunks, path, layout)
    _check_dtypes(expected, thunks, path)
    check_memory(config, f"the model in {path}", error=CheckpointError)
    model = GPT(config, seed=None)
    _fill(model, thunks, path, layout, check_finite)
    _check_tied(head, thunks["wte.weight"], path)
    return model


# ----------------------------------------------------------------------- memory

def available_memory() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable`` from /proc/meminfo, lowered
    to the cgroup's remaining limit when one is set; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:
                found.append(max(int(cap) - int(used), 0))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _gib(n: int) -> str:
    """Bytes in the largest binary unit up to EiB that keeps the number >= 1 (one decimal)."""
    for unit, scale in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**20:,.1f} MiB"


def check_memory(config: GPTConfig, what: str, *, copies: int = 1,
                 role: str = "its parameters", error=ConfigError,
                 bytes_per_parameter: float | None = None) -> None:
    """Refuse ``config`` when ``copies`` x its parameter memory exceeds the available memory,
    naming both numbers (``error``: the exception class for this boundary). A quantized model
    passes its average ``bytes_per_parameter`` (default: the config's dtype)."""
    per = np.dtype(config.np_dtype).itemsize if bytes_per_parameter is None else bytes_per_parameter
    need, have = int(config.parameter_count() * per * copies), available_memory()
    if have is None or need <= have:
        return
    times = f" x {copies}" if copies > 1 else ""
    raise error(f"{what} needs {_gib(need)} for {role} ({config.parameter_count():,} parameters "
                f"x {per:.4g} bytes{times}) but this machine has "
                f"{_gib(have)} available; use smaller n_layer / n_embd / vocab_size / block_size "
                f"(or float32), or a machine with more memory")


def _attach(model: GPT, fmt: str, where: Path, weights: Path, tokenizer, notes: list[str],
            chat_template: str | None = None) -> GPT:
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        notes.append(f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's vocab_size "
                     f"{model.config.vocab_size}: some ids it produces are out of range")
    model.tokenizer = tokenizer
    model.chat_template = chat_template  # None: numgpt's default (io.chat.template_of)
    model.source = {"format": fmt, "path": str(where), "weights": str(weights), "notes": notes}
    return model


# --------------------------------------------------------------- Hugging Face folder

def _hf_config(raw: dict, path: Path, dtype: str) -> GPTConfig:
    """GPTConfig from a GPT-2 ``config.json``; refuses other architectures and options
    numgpt does not implement, naming the key."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):  # a crafted config.json: 7, "GPT2", {...}
        raise CheckpointError(f"{path}: 'architectures' must be a list of names, found "
                              f"{type(archs).__name__} {archs!r:.60}")
    if model_type != "gpt2" or not all(isinstance(a, str) and a.startswith("GPT2") for a in archs):
        raise CheckpointError(f"{path}: model_type {model_type!r}, architectures {archs}: numgpt "
                              f"loads GPT-2 only (model_type 'gpt2', GPT2* architectures)")
    act = raw.get("activation_function", _HF_DEFAULTS["activation_function"])
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{path}: activation_function {act!r} is not supported; numgpt "
                              f"implements {sorted(_HF_ACTIVATIONS)}")
    get = lambda k: raw.get(k, _HF_DEFAULTS.get(k))  # noqa: E731
    n_embd = get("n_embd")
    if not is_int(n_embd):  # checked before n_inner's rule multiplies it
        raise CheckpointError(f"{path}: n_embd must be an integer, found {type(n_embd).__name__} "
                              f"{n_embd!r:.60}")
    unsupported = {"n_inner": raw.get("n_inner") not in (None, 4 * n_embd),
                   "scale_attn_weights": raw.get("scale_attn_weights", True) is not True,
                   "scale_attn_by_inverse_layer_idx": bool(raw.get("scale_attn_by_inverse_layer_idx")),
                   "add_cross_attention": bool(raw.get("add_cross_attention"))}
    bad = {k: raw.get(k) for k, v in unsupported.items() if v}
    if bad:
        raise CheckpointError(f"{path}: GPT-2 variant options numgpt does not implement: {bad} "
                              f"(supported: n_inner null or 4*n_embd, scale_attn_weights true, "
                              f"no inverse-layer scaling, no cross-attention)")
    try:
        return GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"),
                         n_layer=get("n_layer"), n_head=get("n_head"), n_embd=get("n_embd"),
                         bias=True, dropout=float(get("resid_pdrop") or 0.0),
                         activation=_HF_ACTIVATIONS[act],
                         layer_norm_epsilon=get("layer_norm_epsilon"), dtype=dtype)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hf_weights(folder: Path, stack: ExitStack) -> tuple[dict[str, Thunk], str, Path]:
    """Readers for a folder's tensors (single or sharded safetensors, else .bin)."""
    single, index, binary = (folder / n for n in _HF_WEIGHT_FILES)
    if single.is_file():
        thunks, dtype, _ = _safetensors_thunks(single, stack)
        return thunks, dtype, single
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of key -> shard file")
        names = set(weight_map.values())
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise CheckpointError(f"{index}: every 'weight_map' value must be a shard file name "
                                  f"in the folder, found {sorted(map(repr, names))[:3]}")
        thunks, dtypes = {}, set()
        for shard in sorted(names):
            keys = [k for k, v in weight_map.items() if v == shard]
            part, dtype, _ = _safetensors_thunks(folder / shard, stack, keys)
            thunks.update(part)
            dtypes.add(dtype)
        return thunks, ("float64" if "float64" in dtypes else "float32"), index
    if binary.is_file():
        state = _torch_load(binary)
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary}: expected a state dict, found {type(state).__name__}")
        thunks = {k: _Stored(lambda k=k: _torch_to_numpy(state[k], binary, k),
                             getattr(state[k], "shape", None), _torch_kind(state[k])) for k in state}
        return thunks, _torch_dtype(state), binary
    raise CheckpointError(f"{folder}: no weights file; expected one of {list(_HF_WEIGHT_FILES)}")


def _folder_tokenizer(folder: Path) -> GPT2Tokenizer | None:
    """GPT-2 BPE files in ``folder`` (either naming), or None when there are none.

    Files that are present but broken raise: a silently missing tokenizer would hide them.
    """
    if not any((folder / v).is_file() and (folder / m).is_file() for v, m in BPE_FILE_NAMES):
        return None
    return load_tokenizer(folder)


def _hf_tokenizer(folder: Path, raw: dict) -> tuple[Any, list[str]]:
    if raw.get("numgpt_tokenizer") == "bytes":
        return ByteTokenizer(), []
    tok = _folder_tokenizer(folder)
    names = " or ".join(f"{v} + {m}" for v, m in BPE_FILE_NAMES)
    return tok, ([] if tok else [f"no tokenizer attached: the folder has no {names}"])


def _load_hf(folder: Path, dtype: str | None, check_finite: bool = True) -> GPT:
    raw = _read_json(folder / "config.json", "Hugging Face config")
    with ExitStack() as stack:
        thunks, stored, weights = _hf_weights(folder, stack)
        config = _hf_config(raw, folder / "config.json", dtype or stored)
        model = _new_model(config, _normalize(thunks, weights, ("transformer.",)), weights,
                           check_finite=check_finite)
    tokenizer, notes = _hf_tokenizer(folder, raw)
    return _attach(model, "hf", folder, weights, tokenizer, notes, chat.hf_template(folder))


# ------------------------------------------------------------------- nanoGPT ckpt.pt

def _nanogpt_config(args: Any, path: Path, dtype: str) -> GPTConfig:
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: 'model_args' must be a dict, found {type(args).__name__}")
    unknown = sorted(set(args) - _NANOGPT_ARGS)
    missing = sorted({"n_layer", "n_head", "n_embd", "block_size", "vocab_size"} - set(args))
    if unknown or missing:
        raise CheckpointError(f"{path}: model_args has unknown keys {unknown} / lacks {missing}; "
                              f"a nanoGPT GPT-2 has exactly {sorted(_NANOGPT_ARGS)}")
    try:
        return GPTConfig(vocab_size=args["vocab_size"], block_size=args["block_size"],
                         n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                         bias=args.get("bias", True), dropout=float(args.get("dropout", 0.0)),
                         activation="gelu", layer_norm_epsilon=1e-5, dtype=dtype)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_args: {e}") from None


def _nanogpt_thunks(state: dict, path: Path) -> dict[str, Thunk]:
    """nanoGPT tensors by numgpt name; Linear weights (out, in) -> (in, out)."""
    raw = {k: _Stored(lambda k=k: _torch_to_numpy(state[k], path, k), getattr(state[k], "shape", None),
                      _torch_kind(state[k])) for k in state}
    named = _normalize(raw, path, ("_orig_mod.", "module.", "transformer."))
    return {name: (_Stored(lambda t=t: t().T, _shape(t) and _shape(t)[::-1], t.dtype)
                   if _LINEAR_WEIGHT.match(name) else t) for name, t in named.items()}


def _load_nanogpt(path: Path, dtype: str | None, check_finite: bool = True) -> GPT:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint; expected a dict with "
                              f"'model_args' and 'model', found {found}")
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' must be a state dict, found {type(state).__name__}")
    config = _nanogpt_config(ckpt["model_args"], path, dtype or _torch_dtype(state))
    model = _new_model(config, _nanogpt_thunks(state, path), path,
                       layout=" (numgpt (in, out) layout, i.e. nanoGPT's (out, in) transposed)",
                       check_finite=check_finite)
    tokenizer, notes = _nanogpt_tokenizer(path)
    return _attach(model, "nanogpt", path, path, tokenizer, notes)


def _nanogpt_tokenizer(path: Path) -> tuple[Any, list[str]]:
    """nanoGPT does not record its tokenizer; use GPT-2 BPE files beside ckpt.pt if any."""
    tok = _folder_tokenizer(path.parent)
    return tok, ([] if tok else ["nanoGPT checkpoints do not record their tokenizer and no "
                                 "vocab.json + merges.txt sit beside it: no tokenizer attached"])


# -------------------------------------------------------------------- numgpt format

def _read_numgpt_doc(prefix: Path) -> tuple[dict, list[str]]:
    """The checkpoint's document and notes. The ``.json`` unless it is missing or from another
    save than the weights file (a crash between a save's two renames): then the document
    stored in the weights' header, the complete save (``io.recovery``)."""
    path, weights = _with(prefix, ".json"), _with(prefix, ".safetensors")
    inner, notes = weights_doc(weights), []
    if inner is not None and not path.is_file():
        doc = inner
        notes.append(f"{path.name} is missing; read the copy inside {weights.name}")
    else:
        doc = _read_json(path, "numgpt checkpoint config")
        if inner is not None and doc.get("save_id") != inner.get("save_id"):
            doc = inner
            notes.append(f"{path.name} is from an earlier save (a save was interrupted between "
                         f"its two renames); read the newer complete save in {weights.name}")
    if doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: 'format' is {doc.get('format')!r}, expected "
                              f"{FORMAT_NAME!r}; this JSON file is not a numgpt checkpoint")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r}, this numgpt reads version "
                              f"{FORMAT_VERSION}; upgrade numgpt or re-save the checkpoint")
    for key, kind in (("model", dict), ("meta", dict), ("save_id", str)):
        if not isinstance(doc.get(key), kind):
            raise CheckpointError(f"{path}: key {key!r} must be a {kind.__name__}, found "
                                  f"{type(doc.get(key)).__name__}")
    return doc, notes


def _numgpt_tokenizer(doc: dict, prefix: Path) -> tuple[Any, list[str]]:
    cfg = doc.get("tokenizer")
    if cfg is None:
        return None, ["the checkpoint records no tokenizer"]
    try:
        return tokenizer_from_config(cfg, base_dir=prefix.parent), []
    except NumGPTError as e:
        return None, [f"recorded tokenizer {cfg} could not be loaded ({e}); no tokenizer attached"]


def _load_numgpt(prefix: Path, dtype: str | None, check_finite: bool = True,
                 extras: bool = True) -> tuple[GPT, dict, dict[str, np.ndarray]]:
    """(model, meta, extra arrays); ``extras=False`` leaves the ``extra/`` arrays (AdamW's
    moments: twice the model) unread, for loads that only need the model."""
    doc, doc_notes = _read_numgpt_doc(prefix)
    weights = _with(prefix, ".safetensors")
    try:
        config = GPTConfig.from_dict({**doc["model"], **({"dtype": dtype} if dtype else {})})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{_with(prefix, '.json')}: model config: {e}") from None
    with ExitStack() as stack:
        thunks, _, metadata = _safetensors_thunks(weights, stack)
        found_id = metadata.get("save_id")
        if found_id != doc["save_id"]:
            raise CheckpointError(f"{weights} (save_id {found_id!r}) and {_with(prefix, '.json')} "
                                  f"(save_id {doc['save_id']!r}) come from different saves, e.g. a "
                                  f"save interrupted between its two renames; re-save the model")
        params = {k: t for k, t in thunks.items() if not k.startswith(EXTRA_PREFIX)}
        if doc.get("quantization") is not None:
            model = _new_quantized_model(config, params, weights, doc["quantization"], check_finite)
        else:
            model = _new_model(config, params, weights, check_finite=check_finite)
        arrays = {k[len(EXTRA_PREFIX):]: t() for k, t in thunks.items()
                  if extras and k.startswith(EXTRA_PREFIX)}  # read after the model: it was checked
    tokenizer, notes = _numgpt_tokenizer(doc, prefix)
    template = doc.get("chat_template")
    if template is not None:
        template = chat.check_template(template, f"{_with(prefix, '.json')}: 'chat_template'")
    return (_attach(model, "numgpt", prefix, weights, tokenizer, doc_notes + notes, template),
            doc["meta"], arrays)


def _new_quantized_model(config: GPTConfig, thunks: dict[str, Thunk], path: Path,
                         scheme: Any, check_finite: bool = True) -> GPT:
    """A model whose matrices stay in their stored blocks (``core.quant``); computes in float32.
    The same boundary checks as a float model: memory before allocation, and every stored
    float (block scales, biases, LayerNorms, ``wpe``) finite unless ``check_finite=False``."""
    name = scheme.get("scheme") if isinstance(scheme, dict) else None
    if name not in quant.SCHEMES:
        raise CheckpointError(f"{path}: quantization scheme {name!r} is not one this numgpt reads "
                              f"({list(quant.SCHEMES)}); upgrade numgpt or re-quantize")
    if config.dtype != "float32":
        raise CheckpointError(f"{path}: a {name} model computes in float32; it cannot be loaded "
                              f"as {config.dtype} (load the float checkpoint it came from)")
    _check_count(config, len(thunks), path)
    _check_quantized_header(config, thunks, path)
    check_memory(config, f"the model in {path}", error=CheckpointError,
                 bytes_per_parameter=quant.bytes_per_parameter(config, name))
    if check_finite:
        thunks = {key: _finite_after(read, key, path) for key, read in thunks.items()}
    return quant.build_quantized(GPT(config, seed=None), thunks, str(path),
                                 activations=scheme.get("activations") or "float32")


def _check_quantized_header(config: GPTConfig, thunks: Mapping[str, Thunk], path: Path) -> None:
    """A quantized file's names, shapes and dtypes (``quant.stored_shapes``: codes int8,
    scales float16, the rest float) against the config, before anything is allocated. A
    GGUF reader holds a whole matrix under ``NAME.q8_0`` instead of ``.qs`` + ``.scales``."""
    want = quant.stored_shapes(config)
    missing = [k for k in want if k not in thunks and not (
        k.endswith((".qs", ".scales")) and k.rsplit(".", 1)[0] + ".q8_0" in thunks)]
    if missing:
        raise CheckpointError(f"{path}: quantized checkpoint keys do not match the config "
                              f"(n_layer={config.n_layer}, bias={config.bias}): missing "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for key, read in thunks.items():
        shape = want.get(key[:-len(".q8_0")] + ".qs" if key.endswith(".q8_0") else key)
        found, kind = _shape(read), getattr(read, "dtype", None)
        if shape is not None and found is not None and found != tuple(shape):
            raise _shape_mismatch(path, key, shape, found, "")
        need = ("int8" if key.endswith(".qs") else "float16" if key.endswith(".scales")
                else None if key.endswith(".q8_0") else "float")
        if kind is not None and need is not None and (
                kind != need if need != "float" else not _is_float(kind)):
            raise CheckpointError(f"{path}: {key!r} is stored as {kind}, expected {need}; the "
                                  f"file is corrupt or crafted (re-quantize the model)")


def _finite_after(read: Thunk, name: str, path: Path) -> Callable[[], np.ndarray]:
    """``read`` followed by the finite check of what it returns."""
    def checked() -> np.ndarray:
        a = read()
        _check_finite(a, _label(read, name), path)
        return a

    return checked


def _load_gguf(path: Path, dtype: str | None, check_finite: bool = True) -> GPT:
    """A GGUF file (``io.gguf.read_gguf``: header, names, types and shapes checked against
    each other and the file's length) built through the same checks as every format:
    memory before allocation, finite weights and q8_0 scales unless ``check_finite=False``."""
    from .gguf import read_chat_template, read_gguf

    if dtype == "float64":
        raise CheckpointError(f"{path}: GGUF holds f32, f16 or q8_0 tensors and numgpt loads it "
                              f"in float32; convert it to a numgpt checkpoint to cast it")
    config, readers, tokenizer, notes, quantized = read_gguf(path)
    template = read_chat_template(path)
    if quantized:
        model = _new_quantized_model(config, readers, path, {"scheme": "q8_0"}, check_finite)
    else:
        model = _new_model(config, readers, path, check_finite=check_finite)
    return _attach(model, "gguf", path, path, tokenizer, notes, template)


# ---------------------------------------------------------------------- public load

def load(path: str | os.PathLike, dtype=None, *, check_finite: bool = True) -> GPT:
    """Load a GPT-2 from a Hugging Face folder, a nanoGPT ``ckpt.pt`` or a numgpt checkpoint.

    ``dtype`` (None, "float32", "float64" or a numpy dtype) casts the weights; None keeps
    the stored dtype (float16/bfloat16 files become float32). ``check_finite=False`` skips
    the scan that refuses NaN or infinite weights (one pass over them). The model carries
    ``config``, ``tokenizer`` (None if the source has none) and ``source``. A run folder
    (``numgpt train --out``) loads its best checkpoint (``resolve_run_folder``).
    """
    fmt, where = detect_format(resolve_run_folder(path))
    dtype = _dtype_name(dtype)
    if fmt == "hf":
        return _load_hf(where, dtype, check_finite)
    if fmt == "nanogpt":
        return _load_nanogpt(where, dtype, check_finite)
    if fmt == "gguf":
        return _load_gguf(where, dtype, check_finite)
    return _load_numgpt(where, dtype, check_finite, extras=False)[0]


def load_checkpoint(prefix: str | os.PathLike, *,
                    check_finite: bool = True) -> tuple[GPT, dict, dict[str, np.ndarray]]:
    """A numgpt checkpoint with what ``save`` stored beside the model: ``(model, meta, arrays)``."""
    fmt, where = detect_format(prefix)
    if fmt != "numgpt":
        raise CheckpointError(f"{prefix!s} is a {fmt} checkpoint; load_checkpoint reads numgpt "
                              f"checkpoints (PREFIX.json + PREFIX.safetensors); use load() for "
                              f"weights only, or convert it first")
    return _load_numgpt(where, None, check_finite)


def find_tokenizer(path: str | os.PathLike) -> tuple[Any, list[str]]:
    """The tokenizer a checkpoint carries, without reading its weights: ``(tokenizer|None, notes)``."""
    fmt, where = detect_format(resolve_run_folder(path))
    if fmt == "hf":
        return _hf_tokenizer(where, _read_json(where / "config.json", "Hugging Face config"))
    if fmt == "nanogpt":
        return _nanogpt_tokenizer(where)
    if fmt == "gguf":
        from .gguf import read_tokenizer

        return read_tokenizer(where)
    return _numgpt_tokenizer(_read_numgpt_doc(where)[0], where)


def describe(model: GPT) -> dict:
    """What ``numgpt info`` prints: source, config, parameter count, dtype, tokenizer, notes."""
    source = getattr(model, "source", None) or {"format": "in-memory", "path": None, "notes": []}
    tok = model.tokenizer
    return {"format": source["format"], "path": source["path"], "weights": source.get("weights"),
            "config": model.config.to_dict(), "parameters": quant.parameter_count(model),
            "dtype": quant.scheme_of(model) or str(model.wte.weight.data.dtype),
            "quantization": quant.describe(model),
            "tokenizer": None if tok is None else {"type": type(tok).__name__,
                                                   "vocab_size": tok.vocab_size,
                                                   "config": _tokenizer_config(tok)},
            "notes": list(source.get("notes", []))}


def _tokenizer_config(tok) -> dict | None:
    try:
        return tok.to_config()
    except NumGPTError:
        return None


# ---------------------------------------------------------------------------- writes

def _write_temp(path: Path, write: Callable[[Path], None], kept: str = "") -> Path:
    """Run ``write(tmp)`` on a new temp file beside ``path`` (``io.files.temp_path``: exclusive,
    unpredictable name, the target's permission bits) and fsync it; remove it on failure.
    A full disk or read-only folder is a ``WriteError`` naming ``path`` and what is ``kept``."""
    tmp = temp_path(path)
    try:
        with write_errors(path, kept):
            write(tmp)
            fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(pairs: list[tuple[Path, Path]], prefix: Path | None = None, kept: str = "") -> None:
    """Rename each finished temp file onto its target (``os.replace`` is atomic per file), in
    order: the first is the commit. The folder is fsynced so the renames survive a power cut."""
    points = ("weights_renamed", "config_renamed")
    try:
        for i, (tmp, target) in enumerate(pairs):
            with write_errors(target, kept):
                os.replace(tmp, target)
            if prefix is not None and i < len(points):
                _reached(points[i], prefix)
        fsync_dir(pairs[0][1].parent)
    finally:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)


_ST_CODES = {np.dtype(v).name: k for k, v in _ST_NUMPY.items()}  # "float32" -> "F32"


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """Stream ``tensors`` into the safetensors file ``path`` (the empty temporary that
    ``_write_temp`` made, with the mode the finished file should have): an 8-byte header
    length, the JSON header (``__metadata__`` and each tensor's dtype, shape and byte range;
    larger items first, then by name; padded with spaces to 8 bytes, as the library pads
    it), then each array's bytes, with no copy of the model.

    Written here rather than by the safetensors library's ``save_file``, which replaces the
    file numgpt set up by its own (mode 0600 whatever the umask or the previous file's mode)
    through a ``.tmpXXXXXX`` that a kill -9 leaves behind. Every load reads the file through
    the library's ``safe_open``, which validates this header."""
    arrays = {}
    for name, value in tensors.items():
        a = np.asarray(value, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _ST_CODES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:  # truncates the temporary in place: its mode stays
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in order:
            if arrays[name].nbytes:
                f.write(arrays[name].data)


def _write_text(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text, encoding="utf-8")


def _target_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot write {what} into {str(path)!r}: it exists and is not a folder")
    make_folder(path, what)


def _extra_tensors(arrays: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    out = {}
    for name, value in (arrays or {}).items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"extra array names must be non-empty strings, got {name!r}")
        a = np.asarray(value)
        if a.dtype == object or a.dtype.kind not in "biuf":
            raise CheckpointError(f"extra array {name!r} has dtype {a.dtype}; only bool, integer "
                                  f"and float arrays can be stored")
        out[EXTRA_PREFIX + name] = np.asarray(a, order="C")  # not ascontiguousarray: it makes 0-d 1-d
    return out


def _record_tokenizer(tok, prefix: Path) -> dict | None:
    """What a checkpoint records about its tokenizer, so that it stays usable wherever it is
    moved: the byte tokenizer and GPT-2's own BPE by name (numgpt ships both); any other BPE
    as a copy of its files in ``PREFIX.tokenizer/``, recorded relative to the checkpoint (a
    fine-tuned model keeps its vocabulary when the model it started from is deleted). The
    copy is written before the weights, so a crash leaves the tokenizer the save needs."""
    if tok is None:
        return None
    if not isinstance(tok, GPT2Tokenizer) or tok.builtin is not None:
        return tok.to_config()
    folder = _with(prefix, ".tokenizer")
    save_files(tok, folder)
    return {"type": "gpt2-bpe", "path": folder.name}


def save(model: GPT, prefix: str | os.PathLike, *, meta: Mapping[str, Any] | None = None,
         arrays: Mapping[str, Any] | None = None) -> Path:
    """Write ``<prefix>.json`` + ``<prefix>.safetensors`` atomically; returns the prefix.

    ``meta``: JSON-able dict stored under ``"meta"`` (step, losses, train config...).
    ``arrays``: extra ``{name: ndarray}`` stored under ``extra/<name>`` (optimizer moments).
    ``load_checkpoint(prefix)`` gives back ``(model, meta, arrays)``. The tokenizer is
    recorded by name, or its files copied to ``<prefix>.tokenizer/`` (``_record_tokenizer``).
    """
    prefix = _prefix_of(Path(prefix))
    _target_folder(prefix.parent, "a checkpoint")
    save_id = uuid.uuid4().hex
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "save_id": save_id,
           "weights": prefix.name + ".safetensors", "parameters": quant.parameter_count(model),
           "model": model.config.to_dict(), "tokenizer": _record_tokenizer(model.tokenizer, prefix),
           "meta": dict(meta or {})}
    if quant.is_quantized(model):
        doc["quantization"] = quant.describe(model)
    if getattr(model, "chat_template", None) is not None:
        doc["chat_template"] = model.chat_template
    try:
        text = json.dumps(doc, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta must be JSON-serialisable: {e}") from None
    if quant.is_quantized(model):
        tensors = quant.quantized_state(model)  # NAME.qs int8 + NAME.scales float16 per matrix
    else:
        tensors = {n: np.asarray(p.data, order="C") for n, p in model.parameters().items()}
    tensors.update(_extra_tensors(arrays))
    weights, config = _with(prefix, ".safetensors"), _with(prefix, ".json")
    metadata = {"format": "np", "numgpt": FORMAT_NAME, "save_id": save_id, DOC_KEY: text}
    kept = f"the previous checkpoint {str(prefix)!r}, if any, is kept"
    pairs = []
    try:  # the weights (with the document inside) first: renaming them is the commit
        pairs.append((_write_temp(weights, lambda p: _save_safetensors(tensors, p, metadata), kept),
                      weights))
        _reached("weights_written", prefix)
        pairs.append((_write_temp(config, _write_text(text), kept), config))
        _reached("config_written", prefix)
    except BaseException:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
        raise
    _commit(pairs, prefix, kept)
    return prefix


def _hf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Parameters under HF's names; a bias-free model gets exact zero biases (HF has them)."""
    c = model.config
    out = {f"transformer.{n}": np.asarray(p.data, order="C") for n, p in model.parameters().items()}
    if not c.bias:
        dt = c.np_dtype
        widths = {"ln_1": c.n_embd, "attn.c_attn": 3 * c.n_embd, "attn.c_proj": c.n_embd,
                  "ln_2": c.n_embd, "mlp.c_fc": 4 * c.n_embd, "mlp.c_proj": c.n_embd}
        for i in range(c.n_layer):
            for layer, width in widths.items():
                out[f"transformer.h.{i}.{layer}.bias"] = np.zeros(width, dt)
        out["transformer.ln_f.bias"] = np.zeros(c.n_embd, dt)
    return out


def _hf_config_json(model: GPT) -> dict:
    c, tok = model.config, model.tokenizer
    eot = getattr(tok, "eot_id", None)
    doc = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
           "activation_function": _EXPORT_ACTIVATION[c.activation], "vocab_size": c.vocab_size,
           "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
           "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
           "layer_norm_epsilon": c.layer_norm_epsilon, "resid_pdrop": c.dropout,
           "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
           "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
           "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
           "bos_token_id": eot, "eos_token_id": eot, "dtype": c.dtype}
    if isinstance(tok, ByteTokenizer):
        doc["numgpt_tokenizer"] = "bytes"  # HF keeps unknown keys; numgpt's importer reads it
    return doc


def export_hf(model: GPT, folder: str | os.PathLike) -> Path:
    """Write a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors`` + the
    tokenizer's ``vocab.json``/``merges.txt`` when it has them) that
    ``transformers.GPT2LMHeadModel.from_pretrained`` loads with the same logits."""
    folder = Path(folder)
    _target_folder(folder, "a Hugging Face model")
    weights, config = folder / "model.safetensors", folder / "config.json"
    template = chat.template_of(model)
    if quant.is_quantized(model):  # transformers has no q8_0: write the values the blocks hold
        model = quant.dequantize_model(model)
    tensors = _hf_tensors(model)
    text = json.dumps(_hf_config_json(model), indent=2) + "\n"
    kept = f"the previous files in {str(folder)!r}, if any, are kept"
    pairs = [(_write_temp(weights, lambda p: _save_safetensors(tensors, p, {"format": "pt"}), kept),
              weights)]
    try:
        pairs.append((_write_temp(config, _write_text(text), kept), config))
    except BaseException:
        pairs[0][0].unlink(missing_ok=True)
        raise
    _commit(pairs, kept=kept)
    if model.tokenizer is not None:
        save_files(model.tokenizer, folder)
        _write_tokenizer_config(model, folder, template)
    return folder


def _write_tokenizer_config(model: GPT, folder: Path, template: str) -> None:
    """``tokenizer_config.json`` with the model's chat template (numgpt's default when it has
    none), so ``apply_chat_template`` renders what numgpt renders; the special tokens are
    the ones the template reads."""
    doc = {"chat_template": template, "model_max_length": model.config.block_size,
           **chat.special_tokens(model.tokenizer)}
    if isinstance(model.tokenizer, GPT2Tokenizer):
        doc["tokenizer_class"] = "GPT2Tokenizer"
    from .files import atomic_write

    atomic_write(folder / "tokenizer_config.json",
                 (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
