"""Valid tiny model files in every format numgpt reads, for tests that craft hostile
variants of them (``tests/test_faults.py``, ``tests/test_gguf.py``, a fuzz suite).

Every file is written by numgpt's own exporters from a tiny random-weight model, so it
loads as it is; a test then edits bytes, keys or shapes to make it hostile. Nothing here
downloads anything. Builders (each returns the path ``numgpt.load`` takes):

* ``tiny_model(seed=1, **overrides) -> GPT``: ``TINY`` config (n_embd 32, so q8_0 works),
  a ``ByteTokenizer``, non-trivial LayerNorms and biases.
* ``numgpt_checkpoint(prefix, model=None, **overrides) -> Path``: ``prefix.json`` +
  ``prefix.safetensors`` (``checkpoint.save``); returns the prefix.
* ``hf_folder(folder, model=None, **overrides) -> Path``: ``config.json`` +
  ``model.safetensors`` (``checkpoint.export_hf``); returns the folder.
* ``gguf_file(path, dtype="f32", model=None, **overrides) -> Path``: a llama.cpp GPT-2
  GGUF (``io.gguf.write_gguf``, dtype f32 / f16 / q8_0); returns the file.
* ``nanogpt_ckpt(path, model=None, **overrides) -> Path``: a nanoGPT ``ckpt.pt``
  (``model_args`` + ``model`` state dict with nn.Linear weights (out, in)); needs torch
  (call ``pytest.importorskip("torch")`` first); returns the file.

And for crafting GGUF byte by byte (the gguf package's writer refuses most hostile files):

* ``read_gguf_parts(path) -> GGUFParts``: a (trusted, numgpt-written) GGUF split into its
  key/values, tensor infos and data section, read with gguf's own ``GGUFReader``.
* ``encode_gguf(parts) -> bytes`` / ``write_gguf_parts(path, parts) -> Path``: the GGUF v3
  bytes of ``parts`` written by this module's plain encoder, with whatever counts, types,
  offsets and dims the parts hold (nothing is checked).
* ``safetensors_file(path, header, data=b"") -> Path``: a safetensors file with the given
  JSON header dict and data bytes (nothing is checked).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from numgpt.core.model import GPT, GPTConfig
from numgpt.io import checkpoint
from numgpt.io.tokenizer import ByteTokenizer

__all__ = ["TINY", "tiny_model", "numgpt_checkpoint", "hf_folder", "gguf_file", "nanogpt_ckpt",
           "GGUFParts", "read_gguf_parts", "encode_gguf", "write_gguf_parts", "safetensors_file",
           "T"]

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)


class T:
    """GGUF value type codes (the GGUF spec's ``gguf_type``)."""
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = range(8)
    STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12


_SCALAR = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I",
           T.INT32: "<i", T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q",
           T.FLOAT64: "<d"}


def tiny_model(seed: int = 1, **overrides) -> GPT:
    """A random-weight ``GPT`` of ``TINY`` (plus ``overrides``) with a ``ByteTokenizer``."""
    model = GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():  # non-trivial norms and biases too
        if p.data.ndim == 1:
            p.data[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.1, p.data.shape)
    model.tokenizer = ByteTokenizer()
    return model


def numgpt_checkpoint(prefix, model: GPT | None = None, **overrides) -> Path:
    return checkpoint.save(model or tiny_model(**overrides), Path(prefix))


def hf_folder(folder, model: GPT | None = None, **overrides) -> Path:
    return checkpoint.export_hf(model or tiny_model(**overrides), Path(folder))


def gguf_file(path, dtype: str = "f32", model: GPT | None = None, **overrides) -> Path:
    from numgpt.io.gguf import write_gguf

    return write_gguf(model or tiny_model(**overrides), Path(path), dtype)


_LINEAR = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def nanogpt_ckpt(path, model: GPT | None = None, **overrides) -> Path:
    import torch

    model = model or tiny_model(**overrides)
    c = model.config
    state = {}
    for name, p in model.parameters().items():
        a = p.data.T if name.endswith(_LINEAR) else p.data  # nn.Linear is (out, in)
        state["transformer." + name] = torch.from_numpy(np.ascontiguousarray(a))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                bias=c.bias, vocab_size=c.vocab_size, dropout=0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "model_args": args, "iter_num": 0}, path)
    return path


# ----------------------------------------------------------------------- raw GGUF

@dataclass
class GGUFParts:
    """A GGUF file as editable parts.

    ``kvs``: ``[key, type, value]`` lists in file order; an array's type is ``T.ARRAY`` and
    its value ``(element type, [values])``; a string value may be ``bytes`` (raw, e.g. bad
    UTF-8). ``tensors``: dicts ``name``, ``dims`` (ggml order: ne0 = the innermost axis),
    ``type`` (GGML type code), ``offset`` (into the data section). ``data``: the data
    section. ``version`` and ``alignment`` as written."""
    kvs: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    data: bytes = b""
    version: int = 3
    alignment: int = 32

    def get(self, key: str):
        return next(kv for kv in self.kvs if kv[0] == key)

    def set(self, key: str, vtype: int, value) -> "GGUFParts":
        """Replace ``key``'s type and value (append it when absent)."""
        for kv in self.kvs:
            if kv[0] == key:
                kv[1], kv[2] = vtype, value
                return self
        self.kvs.append([key, vtype, value])
        return self

    def drop(self, key: str) -> "GGUFParts":
        self.kvs = [kv for kv in self.kvs if kv[0] != key]
        return self

    def tensor(self, name: str) -> dict:
        return next(t for t in self.tensors if t["name"] == name)


def read_gguf_parts(path) -> GGUFParts:
    """A well-formed GGUF (e.g. from ``gguf_file``) as ``GGUFParts``."""
    import gguf

    r = gguf.GGUFReader(str(path))
    parts = GGUFParts(alignment=int(r.alignment))
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = int(f.types[0])
        value = (int(f.types[-1]), list(f.contents())) if kind == T.ARRAY else f.contents()
        parts.kvs.append([key, kind, value])
    start = int(r.data_offset)
    parts.data = Path(path).read_bytes()[start:]
    for t in r.tensors:
        parts.tensors.append({"name": t.name, "dims": [int(d) for d in t.shape],
                              "type": int(t.tensor_type), "offset": int(t.data_offset) - start})
    return parts


def _string(s) -> bytes:
    raw = s if isinstance(s, bytes) else str(s).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value) -> bytes:
    if vtype == T.STRING:
        return _string(value)
    if vtype == T.ARRAY:
        sub, items = value
        return struct.pack("<IQ", sub, len(items)) + b"".join(_value(sub, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


def encode_gguf(parts: GGUFParts) -> bytes:
    """GGUF v3 bytes: magic, version, counts, key/values, tensor infos, padding, data."""
    out = [b"GGUF", struct.pack("<IQQ", parts.version, len(parts.tensors), len(parts.kvs))]
    out += [_string(k) + struct.pack("<I", t) + _value(t, v) for k, t, v in parts.kvs]
    for t in parts.tensors:
        out.append(_string(t["name"]) + struct.pack("<I", len(t["dims"]))
                   + b"".join(struct.pack("<Q", d) for d in t["dims"])
                   + struct.pack("<IQ", t["type"], t["offset"]))
    head = b"".join(out)
    pad = -len(head) % parts.alignment
    return head + b"\0" * pad + parts.data


def write_gguf_parts(path, parts: GGUFParts) -> Path:
    path = Path(path)
    path.write_bytes(encode_gguf(parts))
    return path


def safetensors_file(path, header: dict, data: bytes = b"") -> Path:
    path = Path(path)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path
