"""Mutations of valid model files, and the hypothesis strategies that draw them, for the
fuzz suite (``tests/test_fuzz.py``).

A case is ``(base, ops)``: ``base`` names a valid tiny file written by ``tests/model_files.py``
(``Bases``), ``ops`` a tuple of edits applied in order. Structured edits change the file's
parts and re-encode them (a GGUF's key/values and tensor infos through
``model_files.encode_gguf``, a safetensors header, a JSON document, a nanoGPT dict before
``torch.save``); raw edits then change bytes (flip, truncate, insert, delete, or overwrite
one header field of a GGUF, e.g. an array length, with a hostile integer). An op names its
target by name (a key, a tensor) or by an integer taken modulo the number of targets, so
hypothesis can draw targets without knowing the file. ``describe(case)`` is the one-line
form the failure reports and the findings use.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

import model_files as mf
from model_files import T

# ------------------------------------------------------------------------ base files


@dataclass
class Bases:
    """The valid files every case starts from, written once into ``folder``."""

    folder: Path

    def __post_init__(self):
        from numgpt.core import quant

        f = self.folder
        self.gguf = {dtype: mf.read_gguf_parts(mf.gguf_file(f / f"base-{dtype}.gguf", dtype))
                     for dtype in ("f32", "f16", "q8_0")}
        self.gguf["empty"] = mf.GGUFParts()
        self.numgpt = {"f32": _numgpt_parts(mf.numgpt_checkpoint(f / "base-f32")),
                       "q8_0": _numgpt_parts(mf.numgpt_checkpoint(
                           f / "base-q8_0", quant.quantize_model(mf.tiny_model(), "q8_0")))}
        hf = mf.hf_folder(f / "base-hf")
        self.hf = {"f32": (json.loads((hf / "config.json").read_text()),
                           _read_safetensors(hf / "model.safetensors"))}
        self.hf_sharded = _shard(*self.hf["f32"])
        bpe = mf.hf_folder(f / "base-hf-bpe", vocab_size=len(_small_bpe()[0]))
        config = json.loads((bpe / "config.json").read_text())
        config.pop("numgpt_tokenizer", None)  # so the folder's BPE files are read
        self.hf_bpe = (config, _read_safetensors(bpe / "model.safetensors"), *_small_bpe())

    def nanogpt(self) -> dict:
        """A fresh nanoGPT checkpoint dict (torch tensors), as ``model_files.nanogpt_ckpt`` saves."""
        import torch

        path = self.folder / "base-ckpt.pt"
        if not path.exists():
            mf.nanogpt_ckpt(path)
        return torch.load(path, weights_only=True)


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _small_bpe() -> tuple[dict, list[str]]:
    """A byte-level BPE vocabulary and merges small enough to build per example: the 256
    byte symbols, a few merges, and ``<|endoftext|>`` last (GPT-2's layout in miniature)."""
    from numgpt.io.tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = ["h e", "Ġ t", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _shard(config: dict, st: tuple[dict, bytes]) -> tuple[dict, dict, list]:
    """A Hugging Face folder's parts split as ``save_pretrained`` shards it: (config, the
    ``model.safetensors.index.json`` document, [(header, data)] of the two shards)."""
    header, data = st
    names = sorted(k for k in header if k != "__metadata__")
    halves = (names[:len(names) // 2], names[len(names) // 2:])
    shards = []
    for part in halves:
        h, chunks, at = {"__metadata__": {"format": "pt"}}, [], 0
        for k in part:
            begin, end = header[k]["data_offsets"]
            h[k] = {**header[k], "data_offsets": [at, at + end - begin]}
            chunks.append(data[begin:end])
            at += end - begin
        shards.append((h, b"".join(chunks)))
    index = {"metadata": {"total_size": len(data)},
             "weight_map": {k: SHARDS[i] for i, part in enumerate(halves) for k in part}}
    return config, index, shards


def _numgpt_parts(prefix: Path) -> tuple[dict, tuple[dict, bytes]]:
    doc = json.loads(Path(f"{prefix}.json").read_text())
    return doc, _read_safetensors(Path(f"{prefix}.safetensors"))


# -------------------------------------------------------------------- shared helpers

def _pick(items: list, target):
    """``items[target]`` for an int (modulo the length), else the item equal to ``target``
    (or whose first element / ``name`` is ``target``)."""
    if isinstance(target, int):
        return items[target % len(items)] if items else None
    for it in items:
        key = it[0] if isinstance(it, list) else it.get("name") if isinstance(it, dict) else it
        if key == target or it == target:
            return it
    return None


RAW_OPS = ("flip", "truncate", "insert", "delete")


def _raw_op(data: bytes, op: tuple) -> bytes | None:
    """Byte-level edits shared by every format; None when ``op`` is not one of them."""
    kind = op[0]
    if kind == "flip" and data:
        pos = op[1] % len(data)
        return data[:pos] + bytes([data[pos] ^ (1 << (op[2] % 8))]) + data[pos + 1:]
    if kind == "truncate":
        return data[:op[1] % (len(data) + 1)] if op[1] >= 0 else data[:op[1]]
    if kind == "insert":
        pos = op[1] % (len(data) + 1)
        return data[:pos] + op[2] + data[pos:]
    if kind == "delete" and data:
        pos = op[1] % len(data)
        return data[:pos] + data[pos + op[2]:]
    if kind in ("flip", "delete"):
        return data
    return None


def _poison_bytes(data: bytes, at: int, dtype: str, value: float) -> bytes:
    with np.errstate(over="ignore"):
        raw = np.array([value], dtype=dtype).tobytes()
    return data[:at] + raw + data[at + len(raw):]


# ------------------------------------------------------------------------------ GGUF

GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def gguf_fields(parts: mf.GGUFParts) -> list[tuple[int, str, str]]:
    """Every header field of ``encode_gguf(parts)`` a count or value can be overwritten in:
    ``(byte offset, struct format, label)``; for arrays the first three elements only."""
    out = [(4, "<I", "version"), (8, "<Q", "tensor_count"), (16, "<Q", "kv_count")]
    pos = 24

    def value(vtype, v, label):
        nonlocal pos
        if vtype == T.STRING:
            out.append((pos, "<Q", f"{label}.len"))
        elif vtype == T.ARRAY:
            sub, items = v
            out.extend([(pos, "<I", f"{label}.item_type"), (pos + 4, "<Q", f"{label}.count")])
            p = pos + 12
            for i, item in enumerate(items[:3]):
                pos = p
                value(sub, item, f"{label}[{i}]")
                p += len(mf._value(sub, item))
        elif vtype in mf._SCALAR:
            out.append((pos, mf._SCALAR[vtype], label))

    for k, vtype, v in parts.kvs:
        name = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
        out.append((pos, "<Q", f"{name}.key_len"))
        pos += len(mf._string(k))
        out.append((pos, "<I", f"{name}.type"))
        start = pos + 4
        pos = start
        value(vtype, v, name)
        pos = start + len(mf._value(vtype, v))
    for t in parts.tensors:
        name = t["name"].decode("utf-8", "replace") if isinstance(t["name"], bytes) else t["name"]
        out.append((pos, "<Q", f"{name}.name_len"))
        pos += len(mf._string(t["name"]))
        out.append((pos, "<I", f"{name}.n_dims"))
        pos += 4
        for i in range(len(t["dims"])):
            out.append((pos, "<Q", f"{name}.dims[{i}]"))
            pos += 8
        out += [(pos, "<I", f"{name}.type"), (pos + 4, "<Q", f"{name}.offset")]
        pos += 12
    return out


def _overwrite(data: bytes, at: int, fmt: str, value) -> bytes:
    if fmt in ("<f", "<d"):
        with np.errstate(over="ignore"):  # past float32's range is inf, as a cast gives
            raw = np.array([float(value)], dtype=fmt.replace("<f", "<f4").replace("<d", "<f8")).tobytes()
    else:
        fmt = "<B" if fmt == "<?" else fmt
        size = struct.calcsize(fmt)
        if isinstance(value, float):  # a float's bits where an integer belongs (inf: 0x7ff0...)
            with np.errstate(over="ignore"):  # past float32's range is inf, as a cast gives
                bits = np.array([value], dtype=f"<f{max(size, 4)}").tobytes()
            value = int.from_bytes(bits[:size], "little")
        raw = (int(value) % (1 << (8 * size))).to_bytes(size, "little")
    return data[:at] + raw + data[at + len(raw):]


_GGML_ITEM = {GGML_F32: ("<f4", 4), GGML_F16: ("<f2", 2), GGML_Q8_0: ("<f2", 34)}


def _gguf_structured(parts: mf.GGUFParts, op: tuple) -> bool:
    kind = op[0]
    if kind == "kv_set":
        kv = _pick(parts.kvs, op[1])
        if kv is None:
            parts.kvs.append([op[1], op[2], op[3]])
        else:
            kv[1], kv[2] = op[2], op[3]
    elif kind == "kv_add":
        parts.kvs.append([op[1], op[2], op[3]])
    elif kind == "kv_drop":
        kv = _pick(parts.kvs, op[1])
        parts.kvs = [x for x in parts.kvs if x is not kv]
    elif kind == "tensor_set":
        t = _pick(parts.tensors, op[1])
        if t is not None:
            t[op[2]] = op[3]
    elif kind == "tensor_drop":
        t = _pick(parts.tensors, op[1])
        parts.tensors = [x for x in parts.tensors if x is not t]
    elif kind == "tensor_dup":
        t = _pick(parts.tensors, op[1])
        if t is not None:
            parts.tensors.append(dict(t))
    elif kind == "overlap":  # tensor op[2] starts where tensor op[1] does
        a, b = _pick(parts.tensors, op[1]), _pick(parts.tensors, op[2])
        if a is not None and b is not None:
            b["offset"] = a["offset"]
    elif kind == "tensor_add":  # name, dims (ggml order), type, offset
        parts.tensors.append({"name": op[1], "dims": list(op[2]), "type": op[3], "offset": op[4]})
    elif kind == "data":  # the data section: n bytes of a repeated pattern
        parts.data = (op[2] * (op[1] // max(len(op[2]), 1) + 1))[:op[1]]
    elif kind == "poison":  # the first value (f32/f16) or first block scale (q8_0) of a tensor
        t = _pick(parts.tensors, op[1])
        if t is not None and t["type"] in _GGML_ITEM and t["offset"] < len(parts.data):
            dtype, _ = _GGML_ITEM[t["type"]]
            parts.data = _poison_bytes(parts.data, t["offset"], dtype, op[2])
    else:
        return False
    return True


def gguf_bytes(bases: Bases, base: str, ops: tuple) -> bytes:
    parts = copy.deepcopy(bases.gguf[base])
    raw_ops = [op for op in ops if not _gguf_structured(parts, op)]
    data = mf.encode_gguf(parts)
    fields = gguf_fields(parts)
    for op in raw_ops:
        if op[0] == "field":
            f = (_pick(fields, op[1]) if isinstance(op[1], int)
                 else next((x for x in fields if x[2] == op[1]), None))
            if f is not None:
                data = _overwrite(data, f[0], f[1], op[2])
        else:
            data = _raw_op(data, op)
    return data


def write_gguf_case(bases: Bases, case: tuple, folder: Path) -> Path:
    path = folder / "case.gguf"
    path.write_bytes(gguf_bytes(bases, *case))
    return path


# ----------------------------------------------- safetensors + JSON (numgpt and HF)

def _json_path(doc: dict, target) -> tuple[dict, str] | None:
    """(the dict holding a leaf, its key): by index over every leaf, or a ``a.b`` path."""
    leaves = []

    def walk(d):
        for k, v in d.items():
            leaves.append((d, k))
            if isinstance(v, dict):
                walk(v)

    walk(doc)
    if isinstance(target, int):
        return leaves[target % len(leaves)] if leaves else None
    *outer, last = target.split(".")
    d = doc
    for k in outer:
        d = d.get(k) if isinstance(d, dict) else None
    return (d, last) if isinstance(d, dict) else None


def _st_structured(header: dict, data: bytearray, op: tuple) -> bool:
    kind = op[0]
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "st_set":
        name = _pick(names, op[1])
        if name is not None and isinstance(header[name], dict):
            header[name][op[2]] = op[3]
    elif kind == "st_meta":
        meta = header.setdefault("__metadata__", {})
        if isinstance(meta, dict):
            meta[op[1]] = op[2]
    elif kind == "st_drop":
        header.pop(_pick(names, op[1]), None)
    elif kind == "st_dup":  # a second name for the same bytes
        name = _pick(names, op[1])
        if name is not None:
            header[name + ".copy"] = copy.deepcopy(header[name])
    elif kind == "poison":
        name = _pick(names, op[1])
        entry = header.get(name)
        dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": None}
        kind_ = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(kind_, str) and dtypes.get(kind_) and isinstance(entry.get("data_offsets"), list) \
                and entry["data_offsets"] and isinstance(entry["data_offsets"][0], int):
            at = entry["data_offsets"][0]
            with np.errstate(over="ignore"):
                raw = np.array([op[2]], dtype=dtypes[kind_]).tobytes()
            if 0 <= at <= len(data) - len(raw):
                data[at:at + len(raw)] = raw
    else:
        return False
    return True


def _json_structured(doc: dict, op: tuple) -> bool:
    kind = op[0]
    if kind == "json_set":
        where = _json_path(doc, op[1])
        if where is not None:
            where[0][where[1]] = op[2]
    elif kind == "json_del":
        where = _json_path(doc, op[1])
        if where is not None:
            where[0].pop(where[1], None)
    elif kind == "json_add":
        doc[op[1]] = op[2]
    else:
        return False
    return True


def _dump_json(doc) -> bytes:
    return json.dumps(doc, indent=2).encode()  # NaN/Infinity as Python writes them


def _st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def json_weights_bytes(doc: dict, st: tuple[dict, bytes], ops: tuple) -> tuple[bytes, bytes]:
    """The (JSON document, safetensors) bytes of a numgpt checkpoint or HF folder after ``ops``.
    Raw ops carry the file they edit as their last element: ``"json"`` or ``"weights"``."""
    doc, (header, data) = copy.deepcopy(doc), (copy.deepcopy(st[0]), bytearray(st[1]))
    raw_ops = [op for op in ops
               if not (_json_structured(doc, op) or _st_structured(header, data, op))]
    files = {"json": _dump_json(doc), "weights": _st_bytes(header, bytes(data))}
    for op in raw_ops:
        which = op[-1]
        if op[0] == "header_len":  # the safetensors header's length field
            files["weights"] = _overwrite(files["weights"], 0, "<Q", op[1])
        else:
            files[which] = _raw_op(files[which], op[:-1])
    return files["json"], files["weights"]


def write_numgpt_case(bases: Bases, case: tuple, folder: Path) -> Path:
    base, ops = case
    doc, weights = json_weights_bytes(*bases.numgpt[base], ops)
    (folder / "case.json").write_bytes(doc)
    (folder / "case.safetensors").write_bytes(weights)
    return folder / "case"


HF_EXTRA_FILES = ("tokenizer_config.json", "chat_template.jinja")


def write_hf_case(bases: Bases, case: tuple, folder: Path) -> Path:
    """A Hugging Face folder after ``ops``; ``("hf_file", name, bytes)`` adds one of
    ``HF_EXTRA_FILES`` (where a chat template is read from)."""
    import shutil

    base, ops = case
    extra = {op[1]: op[2] for op in ops if op[0] == "hf_file"}
    doc, weights = json_weights_bytes(*bases.hf[base], tuple(op for op in ops if op[0] != "hf_file"))
    hf = folder / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir()
    (hf / "config.json").write_bytes(doc)
    (hf / "model.safetensors").write_bytes(weights)
    for name, data in extra.items():
        (hf / name).write_bytes(data)
    return hf


def _index_structured(index, op: tuple):
    """Index edits; returns (the index, whether ``op`` was one)."""
    kind = op[0]
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if kind == "index_set" and isinstance(wm, dict) and wm:
        wm[_pick(sorted(wm), op[1])] = op[2]
    elif kind == "index_all" and isinstance(wm, dict):
        for k in wm:
            wm[k] = op[1]
    elif kind == "index_doc":
        index = op[1]
    elif kind not in ("index_set", "index_all"):
        return index, False
    return index, True


def write_hf_sharded_case(bases: Bases, case: tuple, folder: Path) -> Path:
    """A sharded Hugging Face folder after ``ops``; a shard named ``"FIFO"`` in the index
    becomes a named pipe in the folder (a reader that opens it waits forever)."""
    import os
    import shutil

    _, ops = case
    config, index, shards = copy.deepcopy(bases.hf_sharded)
    header, data = shards[0][0], bytearray(shards[0][1])
    raw_ops = []
    for op in ops:
        index, done = _index_structured(index, op)
        if not (done or _json_structured(config, op) or _st_structured(header, data, op)):
            raw_ops.append(op)
    files = {"json": _dump_json(config), "index": _dump_json(index),
             "weights": _st_bytes(header, bytes(data))}
    for op in raw_ops:
        if op[0] == "header_len":
            files["weights"] = _overwrite(files["weights"], 0, "<Q", op[1])
        elif op[-1] in files:
            files[op[-1]] = _raw_op(files[op[-1]], op[:-1])
    hf = folder / "hf-sharded"
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir()
    (hf / "config.json").write_bytes(files["json"])
    (hf / "model.safetensors.index.json").write_bytes(files["index"])
    (hf / SHARDS[0]).write_bytes(files["weights"])
    (hf / SHARDS[1]).write_bytes(_st_bytes(*shards[1]))
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if isinstance(wm, dict) and "FIFO" in wm.values():
        os.mkfifo(hf / "FIFO")
    return hf


def _bpe_structured(vocab, merges: list, op: tuple):
    """Tokenizer-file edits; returns (vocab, whether ``op`` was one)."""
    kind = op[0]
    keys = sorted(vocab) if isinstance(vocab, dict) else []
    if kind == "vocab_set" and keys:
        vocab[_pick(keys, op[1])] = op[2]
    elif kind == "vocab_add" and isinstance(vocab, dict):
        vocab[op[1]] = op[2]
    elif kind == "vocab_doc":
        vocab = op[1]
    elif kind == "merges_line" and merges:
        merges[op[1] % len(merges)] = op[2]
    elif kind == "merges_add":
        merges.insert(op[1] % (len(merges) + 1), op[2])
    elif kind not in ("vocab_set",):
        return vocab, False
    return vocab, True


def write_hf_bpe_case(bases: Bases, case: tuple, folder: Path) -> Path:
    """A Hugging Face folder with its own BPE files (vocab.json, merges.txt) after ``ops``."""
    _, ops = case
    config, (header, data), vocab, merges = copy.deepcopy(bases.hf_bpe)
    data, raw_ops = bytearray(data), []
    for op in ops:
        vocab, done = _bpe_structured(vocab, merges, op)
        if not (done or _json_structured(config, op) or _st_structured(header, data, op)):
            raw_ops.append(op)
    files = {"json": _dump_json(config), "weights": _st_bytes(header, bytes(data)),
             "vocab": json.dumps(vocab, ensure_ascii=False).encode("utf-8", "surrogatepass"),
             "merges": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8", "surrogatepass")}
    for op in raw_ops:
        if op[-1] in files:
            files[op[-1]] = _raw_op(files[op[-1]], op[:-1])
    hf = folder / "hf-bpe"
    hf.mkdir(exist_ok=True)
    for name, key in (("config.json", "json"), ("model.safetensors", "weights"),
                      ("vocab.json", "vocab"), ("merges.txt", "merges")):
        (hf / name).write_bytes(files[key])
    return hf


# --------------------------------------------------------------------------- nanoGPT

_TORCH_DTYPES = ("int32", "int64", "int8", "uint8", "bool", "float16", "bfloat16", "float64",
                 "complex64")


def nanogpt_object(ckpt: dict, ops: tuple) -> tuple[object, list[tuple]]:
    """The object to ``torch.save`` after the structured ops, and the raw ops left."""
    import torch

    raw = []
    for op in ops:
        kind = op[0]
        state = ckpt.get("model") if isinstance(ckpt, dict) else None
        args = ckpt.get("model_args") if isinstance(ckpt, dict) else None
        names = sorted(state) if isinstance(state, dict) else []
        if kind == "args_set" and isinstance(args, dict):
            key = op[1] if isinstance(op[1], str) else _pick(sorted(args), op[1])
            args[key] = op[2]
        elif kind == "args_del" and isinstance(args, dict):
            args.pop(_pick(sorted(args), op[1]), None)
        elif kind == "top_set" and isinstance(ckpt, dict):
            ckpt[op[1]] = op[2]
        elif kind == "tensor_dtype" and names:
            name = _pick(names, op[1])
            if isinstance(state[name], torch.Tensor):
                state[name] = state[name].to(getattr(torch, op[2]))
        elif kind == "tensor_shape" and names:
            state[_pick(names, op[1])] = torch.zeros(op[2])
        elif kind == "tensor_value" and names:  # not a tensor at all
            state[_pick(names, op[1])] = op[2]
        elif kind == "tensor_drop" and names:
            state.pop(_pick(names, op[1]))
        elif kind == "poison" and names and isinstance(state[_pick(names, op[1])], torch.Tensor):
            name = _pick(names, op[1])
            t = state[name].clone()
            if t.is_floating_point() and t.numel():
                with np.errstate(over="ignore"):  # past the dtype's range is inf, as a cast gives
                    t.view(-1)[0] = float(np.array(op[2], dtype=str(t.dtype).split(".")[1]
                                                   if t.dtype != torch.bfloat16 else "float32"))
                state[name] = t
        elif kind in RAW_OPS:
            raw.append(op)
    return ckpt, raw


def write_nanogpt_case(bases: Bases, case: tuple, folder: Path) -> Path:
    import io

    import torch

    _, ops = case
    obj, raw_ops = nanogpt_object(bases.nanogpt(), ops)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    for op in raw_ops:
        data = _raw_op(data, op)
    path = folder / "ckpt.pt"
    path.write_bytes(data)
    return path


def describe(case: tuple) -> str:
    base, ops = case
    text = f"{base}: " + "; ".join(" ".join(_short(x) for x in op) for op in ops)
    return text if len(text) < 400 else text[:400] + "..."


def _short(x) -> str:
    r = repr(x)
    return r if len(r) < 80 else r[:60] + f"...({len(r)} chars)"


# ---------------------------------------------------------------------- strategies

# integers a hostile header is made of: the edges of every width, and a few sizes
EDGE_INTS = [0, 1, 2, 3, 7, 31, 32, 33, 255, 256, 65535, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1,
             2 ** 32, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 2.5, 1e-45, 3e38, -1.0, 1e300]

edge_ints = st.sampled_from(EDGE_INTS) | st.integers(0, 2 ** 64 - 1) | st.integers(0, 300)
floats = st.sampled_from(SPECIAL_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
floats32 = st.sampled_from([x for x in SPECIAL_FLOATS if not math.isfinite(x) or abs(x) < 3.4e38]
                           ) | st.floats(width=32)
raw_bytes = st.binary(min_size=1, max_size=16) | st.sampled_from(
    [b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"GGUF", b"{", b'"'])
gguf_strings = st.text(max_size=12) | raw_bytes | st.sampled_from(
    ["gpt2", "llama", "", "gelu", "gelu_tanh", "relu", "true", "false", "1024", "1e-5", "nan"])

_INT_RANGES = {T.UINT8: (0, 255), T.INT8: (-128, 127), T.UINT16: (0, 65535),
               T.INT16: (-32768, 32767), T.UINT32: (0, 2 ** 32 - 1),
               T.INT32: (-2 ** 31, 2 ** 31 - 1), T.UINT64: (0, 2 ** 64 - 1),
               T.INT64: (-2 ** 63, 2 ** 63 - 1)}


def _scalar(vtype: int):
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        return st.sampled_from([v for v in EDGE_INTS + [-1, lo] if lo <= v <= hi]) | st.integers(lo, hi)
    if vtype == T.FLOAT32:
        return floats32
    if vtype == T.FLOAT64:
        return floats
    if vtype == T.BOOL:
        return st.booleans()
    return gguf_strings


def gguf_value():
    """(type, value) of a GGUF key/value: any scalar type, a string, or a short array."""
    scalar_types = st.sampled_from(sorted(_INT_RANGES) + [T.FLOAT32, T.FLOAT64, T.BOOL, T.STRING])
    scalar = scalar_types.flatmap(lambda t: st.tuples(st.just(t), _scalar(t)))
    array = scalar_types.flatmap(lambda t: st.tuples(
        st.just(T.ARRAY), st.tuples(st.just(t), st.lists(_scalar(t), max_size=4))))
    return scalar | array


GGUF_KEYS = ["general.architecture", "general.alignment", "gpt2.context_length",
             "gpt2.embedding_length", "gpt2.feed_forward_length", "gpt2.block_count",
             "gpt2.attention.head_count", "gpt2.attention.layer_norm_epsilon",
             "numgpt.activation", "numgpt.bias", "numgpt.tokenizer", "tokenizer.ggml.model",
             "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.eos_token_id"]
TENSOR_NAMES = ["token_embd.weight", "position_embd.weight", "blk.0.attn_qkv.weight",
                "blk.1.ffn_down.weight", "output_norm.weight", "output.weight", "blk.2.attn_norm.weight"]
target = st.integers(0, 10 ** 6)
dims = st.lists(st.sampled_from([0, 1, 16, 31, 32, 96, 256, 2 ** 32, 2 ** 40, 2 ** 63]) | st.integers(0, 300),
                max_size=5)
raw_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 7), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 7)),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 7), raw_bytes),
    st.tuples(st.just("delete"), st.integers(0, 10 ** 7), st.integers(1, 64)))
header_raw_op = st.one_of(  # byte edits aimed at the first 2 KiB, where the header is
    st.tuples(st.just("flip"), st.integers(0, 2048), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 2048), raw_bytes),
    st.tuples(st.just("delete"), st.integers(0, 2048), st.integers(1, 16)))

# chat templates (Jinja2) a stranger's file may carry: broken, raising, huge, deeply nested
template_text = st.text(max_size=40) | st.sampled_from([
    "{{", "{% for %}", "{% for m in messages %}", "{{ raise_exception('no') }}", "{% endfor %}",
    "{{ " + "(" * 500 + "1" + ")" * 500 + " }}", "{% for i in range(10**12) %}x{% endfor %}",
    "{{ messages.__class__.__mro__ }}", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% if %}", "{{ 1/0 }}", " ", "{# unterminated"]) | st.just(300000).map(lambda n: "x" * n)
gguf_op = st.one_of(
    st.tuples(st.just("field"), target, edge_ints | floats),
    st.tuples(st.just("kv_set"), st.just("tokenizer.chat_template"), st.just(T.STRING), template_text),
    st.tuples(st.just("kv_set"), target | st.sampled_from(GGUF_KEYS), gguf_value()).map(
        lambda t: (t[0], t[1], *t[2])),
    st.tuples(st.just("kv_add"), st.sampled_from(GGUF_KEYS) | gguf_strings, gguf_value()).map(
        lambda t: (t[0], t[1], *t[2])),
    st.tuples(st.just("kv_drop"), target | st.sampled_from(GGUF_KEYS)),
    st.tuples(st.just("tensor_set"), target, st.just("dims"), dims),
    st.tuples(st.just("tensor_set"), target, st.just("type"),
              st.sampled_from([0, 1, 2, 8, 30, 39, 2 ** 31]) | st.integers(0, 2 ** 32 - 1)),
    st.tuples(st.just("tensor_set"), target, st.just("offset"), edge_ints),
    st.tuples(st.just("tensor_set"), target, st.just("name"), st.sampled_from(TENSOR_NAMES) | gguf_strings),
    st.tuples(st.just("tensor_drop"), target),
    st.tuples(st.just("tensor_dup"), target),
    st.tuples(st.just("overlap"), target, target),
    st.tuples(st.just("poison"), target, floats),
    raw_op, header_raw_op)

gguf_case = st.tuples(st.sampled_from(["f32", "f16", "q8_0"]),
                      st.lists(gguf_op, min_size=1, max_size=3).map(tuple))


# GGUF files built from nothing: GPT-2's keys (each present or not, of the right type with a
# plausible value or of any type), tensors under GPT-2's names for 0-2 layers with small dims,
# any of three types and offsets laid out in order or drawn, and a data section of any size.
_PLAUSIBLE = {"general.architecture": (T.STRING, st.sampled_from(["gpt2", "llama", ""])),
              "gpt2.context_length": (T.UINT32, st.sampled_from([0, 1, 16, 2 ** 31])),
              "gpt2.embedding_length": (T.UINT32, st.sampled_from([0, 1, 32, 2 ** 31])),
              "gpt2.feed_forward_length": (T.UINT32, st.sampled_from([0, 128, 4])),
              "gpt2.block_count": (T.UINT32, st.sampled_from([0, 1, 2, 2 ** 32 - 1])),
              "gpt2.attention.head_count": (T.UINT32, st.sampled_from([0, 1, 2, 3])),
              "gpt2.attention.layer_norm_epsilon": (T.FLOAT32, st.sampled_from([1e-5, 0.0, -1.0]))}


def _often(draw, likely, rarely, tenths: int = 8):
    """``likely`` in ``tenths`` of the draws, else ``rarely``: generated files should mostly
    get past the first check to reach the later ones."""
    return draw(likely if draw(st.integers(0, 9)) < tenths else rarely)


def _gen_tensors(draw):
    from numgpt.io.gguf import tensor_names

    names = sorted(tensor_names(draw(st.integers(0, 2))).values())
    if draw(st.integers(0, 9)) < 3:
        names = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    ops, offset = [], 0
    for name in names:
        shape = _often(draw, st.lists(st.sampled_from([1, 16, 32, 96, 128, 256]), min_size=1,
                                      max_size=2), dims, 9)
        kind = _often(draw, st.sampled_from([GGML_F32, GGML_F32, GGML_F16, GGML_Q8_0]),
                      st.integers(0, 40), 9)
        at = _often(draw, st.just(offset), edge_ints, 9)
        ops.append(("tensor_add", name, tuple(shape), kind, at))
        n = int(np.prod(shape, dtype=object)) if shape else 1
        if n < 2 ** 24:
            offset += n * 4 + (-(n * 4) % 32)
    return ops, offset


@st.composite
def generated_gguf_case(draw):
    ops = []
    for key, (vtype, plausible) in _PLAUSIBLE.items():
        if draw(st.integers(0, 19)) > 0:
            tv = _often(draw, st.tuples(st.just(vtype), plausible), gguf_value())
            ops.append(("kv_add", key, *tv))
    if draw(st.integers(0, 9)) < 3:
        ops.append(draw(st.tuples(st.just("kv_add"), st.sampled_from(GGUF_KEYS) | gguf_strings,
                                  gguf_value()).map(lambda t: (t[0], t[1], *t[2]))))
    tensors, size = _gen_tensors(draw)
    ops += tensors
    ops.append(("data", _often(draw, st.just(size), st.integers(0, 2 * size + 64)),
                draw(st.sampled_from([b"\0", b"\x00\x3c", b"\x00\x00\x80\x3f", b"\xff"]))))
    if draw(st.integers(0, 9)) < 3:
        ops.append(draw(gguf_op))
    return ("empty", tuple(ops))


gguf_mutated_or_generated = gguf_case | gguf_case | generated_gguf_case()

# JSON values a hostile config is made of
json_scalar = st.one_of(
    st.sampled_from([10 ** 12, 10 ** 100, 2 ** 63, -1, 0, 1, 2.5, 1e308, 1e-300, True, False,
                     None, "", "gelu", "float16", "true", "x" * 100, math.nan, math.inf]),
    st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True), st.text(max_size=10))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X"]
st_op = st.one_of(
    st.tuples(st.just("st_set"), target, st.just("dtype"), st.sampled_from(ST_DTYPES) | json_value),
    st.tuples(st.just("st_set"), target, st.just("shape"), st.lists(edge_ints, max_size=4) | json_value),
    st.tuples(st.just("st_set"), target, st.just("data_offsets"),
              st.lists(edge_ints, min_size=2, max_size=2) | json_value),
    st.tuples(st.just("st_meta"), st.sampled_from(["save_id", "numgpt_doc", "format", "numgpt"]),
              st.text(max_size=20) | st.sampled_from(["{}", "[]", '{"format": 1}', "nan"])),
    st.tuples(st.just("st_drop"), target),
    st.tuples(st.just("st_dup"), target),
    st.tuples(st.just("poison"), target, floats),
    st.tuples(st.just("header_len"), edge_ints))
json_op = st.one_of(
    st.tuples(st.just("json_set"), target, json_value),
    st.tuples(st.just("json_del"), target),
    st.tuples(st.just("json_add"), st.text(max_size=8) | st.sampled_from(["n_inner", "quantization"]),
              json_value),
    st.tuples(st.just("json_add"), st.just("chat_template"), template_text | json_value))
file_raw_op = st.tuples(raw_op | header_raw_op, st.sampled_from(["json", "weights"])).map(
    lambda t: (*t[0], t[1]))
json_weights_op = st.one_of(json_op, st_op, file_raw_op)

numgpt_case = st.tuples(st.sampled_from(["f32", "q8_0"]),
                        st.lists(json_weights_op, min_size=1, max_size=3).map(tuple))
hf_file_op = st.one_of(
    st.tuples(st.just("hf_file"), st.just("chat_template.jinja"),
              template_text.map(lambda t: t.encode("utf-8", "surrogatepass")) | raw_bytes),
    st.tuples(st.just("hf_file"), st.just("tokenizer_config.json"), st.one_of(
        (template_text | json_value).map(lambda t: json.dumps({"chat_template": t}).encode()),
        st.lists(st.fixed_dictionaries({"name": st.sampled_from(["default", "tool_use", 3]),
                                        "template": template_text | json_scalar}), max_size=2).map(
            lambda t: json.dumps({"chat_template": t}).encode()),
        json_value.map(lambda v: json.dumps(v).encode()), raw_bytes)))
hf_case = st.tuples(st.just("f32"), st.lists(json_weights_op | hf_file_op, min_size=1,
                                             max_size=3).map(tuple))

shard_name = st.sampled_from(["../base-f32.safetensors", "/proc/self/mem", "/dev/zero", "/dev/null",
                              "", ".", "FIFO", "config.json", SHARDS[1], "missing.safetensors",
                              "x/../" + SHARDS[0], SHARDS[0] + "\0"]) | json_scalar
index_op = st.one_of(st.tuples(st.just("index_set"), target, shard_name),
                     st.tuples(st.just("index_all"), shard_name),
                     st.tuples(st.just("index_doc"), json_value))
sharded_raw_op = st.tuples(raw_op | header_raw_op, st.sampled_from(["json", "index", "weights"])).map(
    lambda t: (*t[0], t[1]))
hf_sharded_case = st.tuples(st.just("sharded"), st.lists(
    st.one_of(index_op, index_op, json_op, st_op, sharded_raw_op), min_size=1, max_size=3).map(tuple))

bpe_text = st.text(max_size=12) | st.sampled_from(
    ["Ġ t", "a", "a b c", "", " ", "h e", "Ġt he", "x y", "#version: 0.2", "\udc80 a", "Ġ Ġ"])
bpe_op = st.one_of(
    st.tuples(st.just("vocab_set"), target, st.integers(-2, 300) | st.sampled_from([10 ** 12, 2 ** 63]) | json_scalar),
    st.tuples(st.just("vocab_add"), bpe_text, st.integers(-2, 300) | json_scalar),
    st.tuples(st.just("vocab_doc"), json_value),
    st.tuples(st.just("merges_line"), target, bpe_text),
    st.tuples(st.just("merges_add"), target, bpe_text),
    st.tuples(raw_op | header_raw_op, st.sampled_from(["vocab", "merges"])).map(lambda t: (*t[0], t[1])))
hf_bpe_case = st.tuples(st.just("bpe"), st.lists(bpe_op, min_size=1, max_size=3).map(tuple))

NANOGPT_ARGS = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout"]
python_value = json_value | st.sampled_from([b"bytes", (1, 2), 1 + 2j])
nanogpt_op = st.one_of(
    st.tuples(st.just("args_set"), st.sampled_from(NANOGPT_ARGS) | target, python_value),
    st.tuples(st.just("args_del"), target),
    st.tuples(st.just("top_set"), st.sampled_from(["model", "model_args", "iter_num"]), python_value),
    st.tuples(st.just("tensor_dtype"), target, st.sampled_from(_TORCH_DTYPES)),
    st.tuples(st.just("tensor_shape"), target, st.lists(st.integers(0, 64), max_size=3).map(tuple)),
    st.tuples(st.just("tensor_value"), target, python_value),
    st.tuples(st.just("tensor_drop"), target),
    st.tuples(st.just("poison"), target, floats),
    raw_op, header_raw_op)
nanogpt_case = st.tuples(st.just("f32"), st.lists(nanogpt_op, min_size=1, max_size=3).map(tuple))
