"""Checkpoints: load every GPT-2 source a user has, save and export without pickle.

Three sources, told apart by what is on disk (``detect_format``):

* ``hf``: a Hugging Face GPT-2 folder, ``config.json`` + ``model.safetensors`` (or
  sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``, which needs torch).
  HF's ``Conv1D`` weights are already ``(in, out)``, like numgpt's ``Linear``.
* ``nanogpt``: a nanoGPT ``ckpt.pt`` (``model_args`` + ``model`` state dict, read with
  torch's ``weights_only=True``). Its ``nn.Linear`` weights are ``(out, in)``: transposed
  here, and only here.
* ``numgpt``: ``<prefix>.json`` (format, version, model config, tokenizer config, caller's
  metadata) + ``<prefix>.safetensors`` (parameters by their numgpt names, plus optional
  extra arrays under ``extra/``, e.g. optimizer moments). No pickle anywhere.

Every load checks, and names the file and key when it refuses: missing keys, unexpected
keys, shapes (expected vs found), truncated or corrupt files, non-GPT-2 architectures,
and an output head that is not tied to ``wte``. Every write goes to a temp file in the
same folder and is renamed into place (``os.replace``), so an interrupted save leaves the
previous files whole. The two files of a numgpt checkpoint share a random ``save_id``; if a
crash lands between the two renames, the loader sees the ids differ and says so instead
of pairing a config with the wrong weights.

The loaded ``GPT`` carries ``model.config``, ``model.tokenizer`` (or None) and
``model.source`` (format, path, weights file, notes), which ``describe`` reports.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CheckpointError, ConfigError, NumGPTError
from .files import fsync_path, temp_path
from ..core.model import GPT, GPTConfig
from .tokenizer import (BPE_FILE_NAMES, ByteTokenizer, GPT2Tokenizer, load_tokenizer, save_files,
                        tokenizer_from_config)

__all__ = ["load", "save", "load_checkpoint", "export_hf", "detect_format", "find_tokenizer",
           "describe", "FORMAT_NAME", "FORMAT_VERSION", "EXTRA_PREFIX"]

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


# ------------------------------------------------------------------------ detection

def _prefix_of(path: Path) -> Path:
    """``run/model``, ``run/model.json`` and ``run/model.safetensors`` -> ``run/model``."""
    for suffix in (".json", ".safetensors"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _with(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """What kind of checkpoint ``path`` is: ``("hf", folder)``, ``("nanogpt", file)`` or
    ``("numgpt", prefix)``. CheckpointError (naming what was looked for) if none."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p
        if (p / "ckpt.pt").is_file():
            return "nanogpt", p / "ckpt.pt"
        found = sorted(x.name for x in p.iterdir())[:12]
        raise CheckpointError(f"folder {str(p)!r} holds no checkpoint: expected config.json "
                              f"(Hugging Face) or ckpt.pt (nanoGPT); found {found or 'nothing'}")
    if p.name in (*_HF_WEIGHT_FILES, "config.json") and (p.parent / "config.json").is_file():
        return "hf", p.parent
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

def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file, line and column if not."""
    if not path.is_file():
        raise CheckpointError(f"missing {what} {str(path)!r}")
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

    if not path.is_file():
        raise CheckpointError(f"missing weights file {str(path)!r}")
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
        entry = header[key]
        if entry["dtype"] not in _ST_NUMPY and entry["dtype"] != "BF16":
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which numgpt "
                                  f"cannot read; supported: {sorted(_ST_NUMPY) + ['BF16']}")
        dtypes.add(entry["dtype"])
        thunks[key] = lambda e=entry: _read_tensor(path, e, data_start)
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


def _fill(model: GPT, thunks: Mapping[str, Thunk], path: Path, layout: str = "") -> None:
    """Copy every parameter in, one tensor at a time (peak memory: model + one tensor)."""
    params = model.parameters()
    _check_keys(params, thunks, path, model.config)
    for name, p in params.items():
        a = thunks[name]()
        if a.shape != p.data.shape:
            raise CheckpointError(f"{path}: shape mismatch for {name!r}: expected "
                                  f"{tuple(p.data.shape)}{layout}, found {tuple(a.shape)}; the "
                                  f"weights do not match the config")
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


def _new_model(config: GPTConfig, thunks: dict[str, Thunk], path: Path, layout: str = "") -> GPT:
    head = thunks.pop("lm_head.weight", None)
    model = GPT(config, seed=None)
    _fill(model, thunks, path, layout)
    _check_tied(head, thunks["wte.weight"], path)
    return model


def _attach(model: GPT, fmt: str, where: Path, weights: Path, tokenizer, notes: list[str]) -> GPT:
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        notes.append(f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's vocab_size "
                     f"{model.config.vocab_size}: some ids it produces are out of range")
    model.tokenizer = tokenizer
    model.source = {"format": fmt, "path": str(where), "weights": str(weights), "notes": notes}
    return model


# --------------------------------------------------------------- Hugging Face folder

def _hf_config(raw: dict, path: Path, dtype: str) -> GPTConfig:
    """GPTConfig from a GPT-2 ``config.json``; refuses other architectures and options
    numgpt does not implement, naming the key."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type != "gpt2" or not all(isinstance(a, str) and a.startswith("GPT2") for a in archs):
        raise CheckpointError(f"{path}: model_type {model_type!r}, architectures {archs}: numgpt "
                              f"loads GPT-2 only (model_type 'gpt2', GPT2* architectures)")
    act = raw.get("activation_function", _HF_DEFAULTS["activation_function"])
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{path}: activation_function {act!r} is not supported; numgpt "
                              f"implements {sorted(_HF_ACTIVATIONS)}")
    get = lambda k: raw.get(k, _HF_DEFAULTS.get(k))  # noqa: E731
    unsupported = {"n_inner": raw.get("n_inner") not in (None, 4 * get("n_embd")),
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
        thunks, dtypes = {}, set()
        for shard in sorted(set(weight_map.values())):
            keys = [k for k, v in weight_map.items() if v == shard]
            part, dtype, _ = _safetensors_thunks(folder / shard, stack, keys)
            thunks.update(part)
            dtypes.add(dtype)
        return thunks, ("float64" if "float64" in dtypes else "float32"), index
    if binary.is_file():
        state = _torch_load(binary)
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary}: expected a state dict, found {type(state).__name__}")
        thunks = {k: (lambda k=k: _torch_to_numpy(state[k], binary, k)) for k in state}
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


def _load_hf(folder: Path, dtype: str | None) -> GPT:
    raw = _read_json(folder / "config.json", "Hugging Face config")
    with ExitStack() as stack:
        thunks, stored, weights = _hf_weights(folder, stack)
        config = _hf_config(raw, folder / "config.json", dtype or stored)
        model = _new_model(config, _normalize(thunks, weights, ("transformer.",)), weights)
    tokenizer, notes = _hf_tokenizer(folder, raw)
    return _attach(model, "hf", folder, weights, tokenizer, notes)


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
    raw = {k: (lambda k=k: _torch_to_numpy(state[k], path, k)) for k in state}
    named = _normalize(raw, path, ("_orig_mod.", "module.", "transformer."))
    return {name: ((lambda t=t: t().T) if _LINEAR_WEIGHT.match(name) else t)
            for name, t in named.items()}


def _load_nanogpt(path: Path, dtype: str | None) -> GPT:
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
                       layout=" (numgpt (in, out) layout, i.e. nanoGPT's (out, in) transposed)")
    tokenizer, notes = _nanogpt_tokenizer(path)
    return _attach(model, "nanogpt", path, path, tokenizer, notes)


def _nanogpt_tokenizer(path: Path) -> tuple[Any, list[str]]:
    """nanoGPT does not record its tokenizer; use GPT-2 BPE files beside ckpt.pt if any."""
    tok = _folder_tokenizer(path.parent)
    return tok, ([] if tok else ["nanoGPT checkpoints do not record their tokenizer and no "
                                 "vocab.json + merges.txt sit beside it: no tokenizer attached"])


# -------------------------------------------------------------------- numgpt format

def _read_numgpt_doc(prefix: Path) -> dict:
    path = _with(prefix, ".json")
    doc = _read_json(path, "numgpt checkpoint config")
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
    return doc


def _numgpt_tokenizer(doc: dict, prefix: Path) -> tuple[Any, list[str]]:
    cfg = doc.get("tokenizer")
    if cfg is None:
        return None, ["the checkpoint records no tokenizer"]
    try:
        return tokenizer_from_config(cfg, base_dir=prefix.parent), []
    except NumGPTError as e:
        return None, [f"recorded tokenizer {cfg} could not be loaded ({e}); no tokenizer attached"]


def _load_numgpt(prefix: Path, dtype: str | None) -> tuple[GPT, dict, dict[str, np.ndarray]]:
    doc = _read_numgpt_doc(prefix)
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
        extras = {k[len(EXTRA_PREFIX):]: t() for k, t in thunks.items() if k.startswith(EXTRA_PREFIX)}
        params = {k: t for k, t in thunks.items() if not k.startswith(EXTRA_PREFIX)}
        model = _new_model(config, params, weights)
    tokenizer, notes = _numgpt_tokenizer(doc, prefix)
    return _attach(model, "numgpt", prefix, weights, tokenizer, notes), doc["meta"], extras


# ---------------------------------------------------------------------- public load

def load(path: str | os.PathLike, dtype=None) -> GPT:
    """Load a GPT-2 from a Hugging Face folder, a nanoGPT ``ckpt.pt`` or a numgpt checkpoint.

    ``dtype`` (None, "float32", "float64" or a numpy dtype) casts the weights; None keeps
    the stored dtype (float16/bfloat16 files become float32). The model carries
    ``config``, ``tokenizer`` (None if the source has none) and ``source``.
    """
    fmt, where = detect_format(path)
    dtype = _dtype_name(dtype)
    if fmt == "hf":
        return _load_hf(where, dtype)
    if fmt == "nanogpt":
        return _load_nanogpt(where, dtype)
    return _load_numgpt(where, dtype)[0]


def load_checkpoint(prefix: str | os.PathLike) -> tuple[GPT, dict, dict[str, np.ndarray]]:
    """A numgpt checkpoint with what ``save`` stored beside the model: ``(model, meta, arrays)``."""
    fmt, where = detect_format(prefix)
    if fmt != "numgpt":
        raise CheckpointError(f"{prefix!s} is a {fmt} checkpoint; load_checkpoint reads numgpt "
                              f"checkpoints (PREFIX.json + PREFIX.safetensors); use load() for "
                              f"weights only, or convert it first")
    return _load_numgpt(where, None)


def find_tokenizer(path: str | os.PathLike) -> tuple[Any, list[str]]:
    """The tokenizer a checkpoint carries, without reading its weights: ``(tokenizer|None, notes)``."""
    fmt, where = detect_format(path)
    if fmt == "hf":
        return _hf_tokenizer(where, _read_json(where / "config.json", "Hugging Face config"))
    if fmt == "nanogpt":
        return _nanogpt_tokenizer(where)
    return _numgpt_tokenizer(_read_numgpt_doc(where), where)


def describe(model: GPT) -> dict:
    """What ``numgpt info`` prints: source, config, parameter count, dtype, tokenizer, notes."""
    source = getattr(model, "source", None) or {"format": "in-memory", "path": None, "notes": []}
    tok = model.tokenizer
    return {"format": source["format"], "path": source["path"], "weights": source.get("weights"),
            "config": model.config.to_dict(), "parameters": model.num_parameters(),
            "dtype": str(model.wte.weight.data.dtype),
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

def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a new temp file beside ``path`` (``io.files.temp_path``: exclusive,
    unpredictable name, the target's permission bits) and fsync it; remove it on failure."""
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each finished temp file onto its target (``os.replace`` is atomic per file)."""
    try:
        for tmp, target in pairs:
            os.replace(tmp, target)
    finally:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)


def _write_text(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text, encoding="utf-8")


def _target_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot write {what} into {str(path)!r}: it exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)


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


def save(model: GPT, prefix: str | os.PathLike, *, meta: Mapping[str, Any] | None = None,
         arrays: Mapping[str, Any] | None = None) -> Path:
    """Write ``<prefix>.json`` + ``<prefix>.safetensors`` atomically; returns the prefix.

    ``meta``: JSON-able dict stored under ``"meta"`` (step, losses, train config...).
    ``arrays``: extra ``{name: ndarray}`` stored under ``extra/<name>`` (optimizer moments).
    ``load_checkpoint(prefix)`` gives back ``(model, meta, arrays)``.
    """
    prefix = _prefix_of(Path(prefix))
    _target_folder(prefix.parent, "a checkpoint")
    save_id = uuid.uuid4().hex
    tok = model.tokenizer
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "save_id": save_id,
           "weights": prefix.name + ".safetensors", "parameters": model.num_parameters(),
           "model": model.config.to_dict(), "tokenizer": None if tok is None else tok.to_config(),
           "meta": dict(meta or {})}
    try:
        text = json.dumps(doc, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta must be JSON-serialisable: {e}") from None
    tensors = {n: np.asarray(p.data, order="C") for n, p in model.parameters().items()}
    tensors.update(_extra_tensors(arrays))
    weights, config = _with(prefix, ".safetensors"), _with(prefix, ".json")
    pairs = []
    try:
        pairs.append((_write_temp(weights, lambda p: _save_safetensors(
            tensors, p, {"format": "np", "numgpt": FORMAT_NAME, "save_id": save_id})), weights))
        pairs.append((_write_temp(config, _write_text(text)), config))
    except BaseException:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
        raise
    _commit(pairs)
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
    tensors = _hf_tensors(model)
    text = json.dumps(_hf_config_json(model), indent=2) + "\n"
    pairs = [(_write_temp(weights, lambda p: _save_safetensors(tensors, p, {"format": "pt"})), weights)]
    try:
        pairs.append((_write_temp(config, _write_text(text)), config))
    except BaseException:
        pairs[0][0].unlink(missing_ok=True)
        raise
    _commit(pairs)
    if model.tokenizer is not None:
        save_files(model.tokenizer, folder)
    return folder
