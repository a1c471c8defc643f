"""GGUF in and out, in llama.cpp's GPT-2 layout. Files are written through the ``gguf``
package's GGUFWriter (published by llama.cpp): numgpt never writes the binary format by hand.
They are read by a bounded parser of ours (see "read" below), because a GGUF file comes from
strangers and GGUFReader allocates in proportion to the counts a file claims.

What a numgpt GGUF holds (``write_gguf``)
-----------------------------------------
* ``general.architecture = gpt2``, ``general.file_type``, and the ``gpt2.*`` hyperparameters
  (context_length, embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.layer_norm_epsilon) that llama.cpp reads.
* The tokenizer: ``tokenizer.ggml.model = gpt2``, ``tokens`` (the byte-to-unicode strings of
  vocab.json, by id), ``token_type`` (1 normal, 3 control for ``<|endoftext|>``), ``merges``
  ("a b" lines), ``bos/eos_token_id``. A byte-level model (vocab 256, no BPE) is written as
  the same gpt2 tokenizer with the 256 byte characters as its tokens in byte order (id b
  is byte b, as in numgpt's ByteTokenizer) and one inert merge ("ĀĀ ĀĀ": a pair of
  two-character symbols that a merge-free BPE never forms, so it never fires): the gguf
  package refuses an empty merges array and llama.cpp's gpt2 tokenizer requires the key.
  BPE with no merges that fire is byte-level tokenization, so llama.cpp reads such a model
  with the same ids numgpt uses.
* Tensors under llama.cpp's names: ``token_embd``, ``position_embd``, ``blk.N.attn_norm``,
  ``attn_qkv``, ``attn_output``, ``ffn_norm``, ``ffn_up``, ``ffn_down``, ``output_norm``
  (``.weight`` and ``.bias``). Matrices are stored (out, in) -- numgpt's (in, out) Linear
  weights transposed, as llama.cpp's own converter does -- and there is no ``output``
  tensor: llama.cpp ties the head to ``token_embd`` when it is absent.
* dtypes: ``f32`` everything float32; ``f16`` the 2-D weights float16 (norms and biases
  float32, as llama.cpp's converter does); ``q8_0`` the matrices and ``token_embd`` in
  q8_0 blocks (a quantized numgpt model's blocks verbatim, so nothing is re-rounded),
  ``position_embd``, norms and biases float32 (numgpt's q8_0 scheme).
* ``numgpt.activation`` and ``numgpt.bias``: llama.cpp's GPT-2 always uses the tanh GELU
  and biases; these keys let numgpt read back an erf-GELU or bias-free model exactly
  (a bias-free model is written with zero biases, which llama.cpp requires).

``read_gguf`` reads GPT-2 GGUF files from numgpt or from llama.cpp's converter (f32, f16,
q8_0 tensors; an ``output.weight`` is accepted only if it equals ``token_embd``): the config
and a reader per tensor, all checked against the header and the file's length before
anything is read. ``numgpt.load`` (``io.checkpoint``) builds the model from them through
the memory and finite checks every format shares; q8_0 matrices stay quantized
(``numgpt.core.quant``). Tensor data is read with ``np.fromfile``, not through a memory map,
so the file's pages do not add to the process's peak memory.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..core import quant
from ..core.model import GPTConfig
from ..errors import CheckpointError, ConfigError
from .tokenizer import ByteTokenizer, GPT2Tokenizer, bytes_to_unicode
from . import chat

__all__ = ["write_gguf", "read_gguf", "read_tokenizer", "GGUF_DTYPES", "tensor_names"]

GGUF_DTYPES = ("f32", "f16", "q8_0")
INERT_MERGE = "ĀĀ ĀĀ"  # see the module docstring: the byte-level model's placeholder merge
_CONTROL, _NORMAL = 3, 1  # llama.cpp token types
_LAYER = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
          "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
          "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
          "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
          "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
          "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias"}
_GLOBAL = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
           "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
_Q8_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (quant.BLOCK,))])  # GGML's block_q8_0, 34 bytes


def tensor_names(n_layer: int) -> dict[str, str]:
    """numgpt parameter name -> GGUF tensor name, for a model with biases."""
    names = dict(_GLOBAL)
    for i in range(n_layer):
        names.update({f"h.{i}.{k}": f"blk.{i}.{v}" for k, v in _LAYER.items()})
    return names


def _is_matrix(name: str) -> bool:
    """The weights q8_0 quantizes: the four Linear weights of each block and wte."""
    return name == "wte.weight" or (name.startswith("h.") and name.endswith(".weight")
                                    and ".ln_" not in name)


# ------------------------------------------------------------------------------ write

def _q8_bytes(w: quant.Q8Matrix) -> np.ndarray:
    """GGML's q8_0 bytes of W (N, K): (N, K/32 * 34) uint8, blocks of float16 d + 32 int8."""
    N, K = w.shape
    blocks = np.empty((N, K // quant.BLOCK), _Q8_BLOCK)
    blocks["d"] = w.scales
    blocks["qs"] = w.qs.reshape(N, K // quant.BLOCK, quant.BLOCK)
    return blocks.view(np.uint8).reshape(N, -1)


def _quantized_matrices(model) -> dict[str, quant.Q8Matrix]:
    """A quantized model's matrices by numgpt name, each (out, in)."""
    out = {"wte.weight": model.wte.weight}
    for i, block in enumerate(model.h):
        for path in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            owner, attr = path.split(".")
            out[f"h.{i}.{path}.weight"] = getattr(getattr(block, owner), attr).weight
    return out


def _model_tensors(model) -> dict[str, np.ndarray | quant.Q8Matrix]:
    """Every GGUF tensor's content by numgpt name: float arrays in GGUF orientation
    ((out, in) matrices) or Q8Matrix; zero biases for a bias-free model."""
    c = model.config
    tensors: dict = {}
    if quant.is_quantized(model):
        tensors.update(_quantized_matrices(model))
    for name, p in model.parameters().items():
        a = p.data
        tensors[name] = a.T if (_is_matrix(name) and name != "wte.weight") else a
    if not c.bias:
        widths = {"ln_1.bias": c.n_embd, "attn.c_attn.bias": 3 * c.n_embd,
                  "attn.c_proj.bias": c.n_embd, "ln_2.bias": c.n_embd,
                  "mlp.c_fc.bias": 4 * c.n_embd, "mlp.c_proj.bias": c.n_embd}
        for i in range(c.n_layer):
            tensors.update({f"h.{i}.{k}": np.zeros(n, np.float32) for k, n in widths.items()})
        tensors["ln_f.bias"] = np.zeros(c.n_embd, np.float32)
    return tensors


def _add_tokenizer(writer, tokenizer, vocab_size: int, template: str) -> None:
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab = json.loads(tokenizer._vocab_text)  # {token: id}
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = [line for line in tokenizer._merges_text.split("\n")
                  if line and not line.startswith("#version")]
        eot = tokenizer.eot_id
    elif isinstance(tokenizer, ByteTokenizer):
        table = bytes_to_unicode()
        tokens, merges, eot = [table[b] for b in range(256)], [INERT_MERGE], None
        writer.add_string("numgpt.tokenizer", "bytes")
    else:
        return  # no tokenizer: llama.cpp needs one, numgpt does not
    if len(tokens) != vocab_size:
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]  # padded vocab (e.g. 50304)
    types = [_CONTROL if i == eot or t.startswith("[PAD") else _NORMAL for i, t in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    writer.add_chat_template(template)  # the model's, or numgpt's default: llama.cpp renders it


def write_gguf(model, path: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write ``model`` as a llama.cpp GPT-2 GGUF file (see the module docstring); atomic."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {list(GGUF_DTYPES)}, got {dtype!r}")
    if dtype == "q8_0" and model.config.n_embd % quant.BLOCK:
        raise ConfigError(f"q8_0 needs n_embd to be a multiple of {quant.BLOCK}, got {model.config.n_embd}")
    c, path = model.config, Path(path)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    def write(f_path: str) -> None:
        writer = gguf.GGUFWriter(f_path, arch="gpt2")
        writer.add_name("numgpt GPT-2")
        writer.add_file_type(file_type)
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        writer.add_string("numgpt.activation", c.activation)
        writer.add_bool("numgpt.bias", c.bias)
        _add_tokenizer(writer, model.tokenizer, c.vocab_size, chat.template_of(model))
        names = tensor_names(c.n_layer)
        for name, value in _model_tensors(model).items():
            _add_tensor(writer, names[name], value, name, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_file(path, write)
    return path


def _atomic_file(path: Path, write: Callable[[str], None]) -> None:
    """``write(temp)`` into a temporary file beside ``path``, then rename it into place; a
    full disk or a read-only folder is one ``WriteError`` line and ``path`` is untouched."""
    from .files import fsync_path, temp_path, write_error, write_errors

    tmp, kept = temp_path(path), f"the previous {path.name}, if any, is kept"
    try:
        with write_errors(path, kept):
            try:
                write(str(tmp))
            except OSError as e:
                if e.errno is not None:
                    raise
                # numpy's tofile (GGUFWriter writes tensors with it) reports a short write as
                # "N requested and M written" with no errno: the disk or the file-size limit
                # is full
                raise write_error(OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {e}"),
                                  path, kept) from None
            fsync_path(tmp)
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _add_tensor(writer, gguf_name: str, value, name: str, dtype: str) -> None:
    import gguf

    if isinstance(value, quant.Q8Matrix):
        if dtype == "q8_0":
            writer.add_tensor(gguf_name, _q8_bytes(value), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            return
        value = value.dequantize(np.float32)  # export of a quantized model as float
    a = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "q8_0" and _is_matrix(name):
        writer.add_tensor(gguf_name, _q8_bytes(quant.quantize_q8_0(a)),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif dtype == "f16" and a.ndim == 2:
        writer.add_tensor(gguf_name, a.astype(np.float16))
    else:
        writer.add_tensor(gguf_name, a)


# ------------------------------------------------------------------------------- read
#
# A GGUF file comes from strangers, so it is read by the bounded code below, not by the gguf
# package's GGUFReader (which builds one numpy view per claimed array element: 49 bytes
# claiming 2^40 elements exhaust memory). Every string length, array count, tensor count and
# dimension is checked against the bytes left in the file before anything is read or
# allocated in proportion to it; strings are strict UTF-8; each key numgpt reads has one
# value type; tensor data ranges lie inside the file, aligned, and never overlap (llama.cpp's
# gguf.cpp refuses the same). Layout (GGUF v2/v3, little-endian): "GGUF", version u32,
# tensor_count u64, kv_count u64; key/values (key: u64 length + bytes, type u32, value);
# tensor infos (name, n_dims u32, dims u64[n_dims] innermost first, type u32, offset u64);
# padding to ``general.alignment`` (default 32); the data section.

_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 2  # an array of arrays at most (numgpt reads none; the bound keeps it flat)
_STRING, _ARRAY, _BOOL = 8, 9, 7
# GGUF value type -> (name, numpy dtype); bool and string are read apart
_SCALARS = {0: ("uint8", "<u1"), 1: ("int8", "<i1"), 2: ("uint16", "<u2"), 3: ("int16", "<i2"),
            4: ("uint32", "<u4"), 5: ("int32", "<i4"), 6: ("float32", "<f4"), 7: ("bool", "<u1"),
            10: ("uint64", "<u8"), 11: ("int64", "<i8"), 12: ("float64", "<f8")}
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}
_FLOATS = {6, 12}
# GGML tensor type -> (name, values per block, bytes per block, numpy dtype of a block)
_TENSOR_TYPES = {0: ("F32", 1, 4, np.dtype("<f4")), 1: ("F16", 1, 2, np.dtype("<f2")),
                 8: ("Q8_0", quant.BLOCK, _Q8_BLOCK.itemsize, _Q8_BLOCK)}


def _type_name(code: int) -> str:
    if code == _STRING:
        return "string"
    if code == _ARRAY:
        return "array"
    return _SCALARS[code][0] if code in _SCALARS else f"unknown type {code}"


def _ggml_type_name(code: int) -> str:
    """A GGML tensor type's name (Q4_0, BF16...) for messages; the number if gguf lacks it."""
    if code in _TENSOR_TYPES:
        return _TENSOR_TYPES[code][0]
    try:
        import gguf

        return gguf.GGMLQuantizationType(code).name
    except (ImportError, ValueError):
        return f"type {code}"


class _Bytes:
    """Sequential reads of a GGUF header, each bounded by the bytes left in the file."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}; the GGUF file is corrupt or crafted "
                               f"(re-download or re-convert it)")

    def take(self, n: int, what: str) -> bytes:
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,} but the file "
                            f"has {left:,} left")
        raw = self.f.read(n)
        if len(raw) != n:  # the file shrank while being read
            raise self.fail(f"{what}: the file ended early at offset {self.pos + len(raw):,}")
        self.pos += n
        return raw

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.u64(f"the length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None

    def count(self, what: str, n: int, min_bytes: int) -> int:
        """A claimed number of items, each at least ``min_bytes`` long, bounded by the file."""
        left = self.size - self.pos
        if n * min_bytes > left:
            raise self.fail(f"{what} claims {n:,} items (at least {n * min_bytes:,} bytes) but "
                            f"the file has {left:,} bytes left")
        return n

    def value(self, vtype: int, key: str, depth: int = 0):
        """One value of GGUF type ``vtype``: int / float / bool / str, or for an array
        ``(element type, numpy array | list)`` (scalars as one numpy array, no per-element
        objects)."""
        if vtype == _STRING:
            return self.string(f"the value of {key!r}")
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise self.fail(f"key {key!r} nests arrays more than {_MAX_NESTING} deep")
            sub = self.u32(f"the element type of {key!r}")
            n = self.u64(f"the length of {key!r}")
            if sub in _SCALARS:
                dt = np.dtype(_SCALARS[sub][1])
                self.count(f"array {key!r}", n, dt.itemsize)
                a = np.frombuffer(self.take(n * dt.itemsize, f"array {key!r}"), dt)
                return sub, (a.astype(bool) if sub == _BOOL else a)
            if sub not in (_STRING, _ARRAY):
                raise self.fail(f"array {key!r} has elements of unknown type {sub}")
            self.count(f"array {key!r}", n, 8 if sub == _STRING else 12)
            return sub, [self.value(sub, key, depth + 1) for _ in range(n)]
        if vtype not in _SCALARS:
            raise self.fail(f"key {key!r} has unknown value type {vtype}")
        dt = np.dtype(_SCALARS[vtype][1])
        v = np.frombuffer(self.take(dt.itemsize, f"the value of {key!r}"), dt)[0]
        if vtype == _BOOL:
            if v > 1:
                raise self.fail(f"bool key {key!r} holds {int(v)}, not 0 or 1")
            return bool(v)
        return float(v) if vtype in _FLOATS else int(v)


class _Header:
    """What a GGUF file holds before its data: ``fields`` {key: (type, value)}, ``tensors``
    {name: _Tensor} and the file ``path``."""

    def __init__(self, path: Path, fields: dict, tensors: dict):
        self.path, self.fields, self.tensors = path, fields, tensors


class _Tensor:
    """One tensor of a GGUF file, bounds-checked: ``shape`` in numpy order (ggml's dims
    reversed), ``kind`` (F32/F16/Q8_0), absolute ``offset`` and ``n_bytes``. Calling it
    reads the data with ``np.fromfile`` (not a memory map, so the file's pages do not add to
    peak memory): float arrays, or q8_0's structured blocks (N, K/32)."""

    __slots__ = ("name", "shape", "code", "offset", "n_bytes", "path")

    def __init__(self, name: str, shape: tuple, code: int, offset: int, n_bytes: int, path: Path):
        self.name, self.shape, self.code = name, shape, code
        self.offset, self.n_bytes, self.path = offset, n_bytes, path

    @property
    def kind(self) -> str:
        return _TENSOR_TYPES[self.code][0]

    @property
    def dtype(self) -> str:
        return {"F32": "float32", "F16": "float16", "Q8_0": "q8_0"}[self.kind]

    def __call__(self) -> np.ndarray:
        dt = _TENSOR_TYPES[self.code][3]
        count = self.n_bytes // dt.itemsize
        a = np.fromfile(self.path, dtype=dt, count=count, offset=self.offset)
        if a.size != count:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} ends past the end of the "
                                  f"file (it changed while being read)")
        if self.kind == "Q8_0":
            return a.reshape(*self.shape[:-1], self.shape[-1] // quant.BLOCK)
        return a.reshape(self.shape)


def _read_header(path: Path) -> _Header:
    """Parse and bound-check everything before a GGUF file's data section."""
    from .files import open_regular

    with open_regular(path, "GGUF file") as f:
        size = os.fstat(f.fileno()).st_size
        r = _Bytes(f, size, path)
        magic = r.take(4, "the magic number") if size >= 4 else b""
        if magic != _MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not "
                                  f"{_MAGIC!r}); check the path")
        version = r.u32("the version")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version}; numgpt reads versions 2 and 3 "
                                  f"(re-convert with a current llama.cpp)")
        n_tensors = r.count("the tensor count", r.u64("the tensor count"), 24)
        n_fields = r.count("the key/value count", r.u64("the key/value count"), 13)
        fields: dict[str, tuple] = {}
        for _ in range(n_fields):
            key = r.string("a key name")
            if key in fields:
                raise r.fail(f"key {key!r} appears twice")
            vtype = r.u32(f"the type of {key!r}")
            fields[key] = (vtype, r.value(vtype, key))
        alignment = _alignment(fields, r)
        infos = []
        for _ in range(n_tensors):
            name = r.string("a tensor name")
            n_dims = r.u32(f"the dimension count of {name!r}")
            if n_dims > _MAX_DIMS:
                raise r.fail(f"tensor {name!r} claims {n_dims} dimensions (GGML has at most {_MAX_DIMS})")
            dims = [r.u64(f"a dimension of {name!r}") for _ in range(n_dims)]
            infos.append((name, dims, r.u32(f"the type of {name!r}"), r.u64(f"the offset of {name!r}")))
        data_start = -(-r.pos // alignment) * alignment
    return _Header(path, fields, _tensors(infos, data_start, size, alignment, r))


def _alignment(fields: dict, r: _Bytes) -> int:
    vtype, value = fields.get("general.alignment", (4, 32))
    if vtype != 4 or not (value > 0 and value & (value - 1) == 0):
        raise r.fail(f"general.alignment must be a power-of-two uint32, found "
                     f"{_type_name(vtype)} {value!r}")
    return value


def _tensors(infos: list, data_start: int, size: int, alignment: int, r: _Bytes) -> dict:
    """Tensor infos -> {name: _Tensor}: supported types, whole q8_0 blocks, data aligned,
    inside the file and never overlapping another tensor's."""
    tensors: dict[str, _Tensor] = {}
    for name, dims, code, offset in infos:
        if name in tensors:
            raise r.fail(f"tensor {name!r} appears twice")
        if code not in _TENSOR_TYPES:
            raise CheckpointError(f"{r.path}: tensor {name!r} is {_ggml_type_name(code)}; numgpt "
                                  f"reads F32, F16 and Q8_0 GGUF tensors (re-convert with "
                                  f"--outtype f32/f16/q8_0)")
        kind, per_block, block_bytes, _ = _TENSOR_TYPES[code]
        values = 1
        for d in dims:
            values *= d
        if dims and dims[0] % per_block:
            raise r.fail(f"tensor {name!r} is {kind} with {dims[0]} values per row, not a "
                         f"multiple of its block of {per_block}")
        n_bytes = values // per_block * block_bytes
        begin = data_start + offset
        if offset % alignment:
            raise r.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of "
                         f"the alignment {alignment}")
        if begin + n_bytes > size:
            raise r.fail(f"tensor {name!r} ({kind}, dims {dims}) needs bytes {begin:,}..{begin + n_bytes:,} "
                         f"but the file ends at {size:,}")
        tensors[name] = _Tensor(name, tuple(reversed(dims)), code, begin, n_bytes, r.path)
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in tensors.values() if t.n_bytes)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise r.fail(f"tensors {a!r} and {b!r} overlap in the data section")
    return tensors


# The keys numgpt reads, each with the one GGUF type family it accepts.
_KINDS = {"int": ("an integer", _INTEGERS), "float": ("a float", _FLOATS),
          "bool": ("a bool", {_BOOL}), "str": ("a string", {_STRING})}
_KEYS = {"general.architecture": "str", "gpt2.context_length": "int",
         "gpt2.embedding_length": "int", "gpt2.feed_forward_length": "int",
         "gpt2.block_count": "int", "gpt2.attention.head_count": "int",
         "gpt2.attention.layer_norm_epsilon": "float", "numgpt.bias": "bool",
         "numgpt.activation": "str", "numgpt.tokenizer": "str", "tokenizer.ggml.model": "str",
         "tokenizer.ggml.tokens": "str[]", "tokenizer.ggml.merges": "str[]",
         "tokenizer.chat_template": "str"}


def _found(vtype: int, value) -> str:
    if vtype == _ARRAY:
        sub, items = value
        return f"an array of {len(items):,} {_type_name(sub)}"
    return f"{_type_name(vtype)} {value!r}"


def _key(header: _Header, key: str, default=None):
    """The value of ``key`` if present (``default`` otherwise), refused in one line naming the
    key, the type numgpt expects and what the file holds when its type is another."""
    if key not in header.fields:
        return default
    vtype, value = header.fields[key]
    kind = _KEYS[key]
    if kind.endswith("[]"):
        want, codes = _KINDS[kind[:-2]]
        if vtype == _ARRAY and value[0] in codes:
            return list(value[1])
        want = f"an array of {want[3 if want.startswith('an') else 2:]}s"
    else:
        want, codes = _KINDS[kind]
        if vtype in codes:
            if kind == "float" and not np.isfinite(value):
                raise CheckpointError(f"{header.path}: GGUF key {key!r} must be a finite float, "
                                      f"found {_found(vtype, value)}")
            return value
    raise CheckpointError(f"{header.path}: GGUF key {key!r} must be {want}, found "
                          f"{_found(vtype, value)}; the file is corrupt or crafted")


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def _config(header: _Header) -> GPTConfig:
    """The model's config from the GGUF keys, each typed, and compared with the tensors the
    file holds (blocks present, token_embd's shape) before any per-layer name is built."""
    path = header.path
    arch = _key(header, "general.architecture")
    if arch != "gpt2":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; numgpt reads GPT-2 "
                              f"GGUF files only (architecture 'gpt2')")
    need = ["gpt2.context_length", "gpt2.embedding_length", "gpt2.block_count",
            "gpt2.attention.head_count"]
    missing = [k for k in need if k not in header.fields]
    embd = header.tensors.get("token_embd.weight")
    if missing or embd is None:
        raise CheckpointError(f"{path}: missing GPT-2 keys {missing or ['token_embd.weight']}")
    values = {k: _key(header, k) for k in need}
    n_embd, n_layer = values["gpt2.embedding_length"], values["gpt2.block_count"]
    if len(embd.shape) != 2 or embd.shape[1] != n_embd:
        raise CheckpointError(f"{path}: 'token_embd.weight' has shape {embd.shape}; expected 2 "
                              f"dimensions (vocab, embedding_length={n_embd})")
    blocks = {int(m.group(1)) for m in map(_BLOCK_TENSOR.match, header.tensors) if m}
    if len(blocks) != n_layer or (blocks and max(blocks) != n_layer - 1):  # == range(n_layer),
        # without building a set of n_layer numbers
        held = f"blocks {sorted(blocks)[:4]}{' ...' if len(blocks) > 4 else ''}" if blocks else "no blocks"
        raise CheckpointError(f"{path}: gpt2.block_count is {n_layer} but the file holds tensors "
                              f"of {len(blocks)} block(s) ({held}); the header and the tensors disagree")
    ff = _key(header, "gpt2.feed_forward_length", 4 * n_embd)
    if ff != 4 * n_embd:
        raise CheckpointError(f"{path}: feed_forward_length {ff} is not 4 x embedding_length "
                              f"({4 * n_embd}); numgpt's GPT-2 MLP is 4x wide")
    try:
        return GPTConfig(vocab_size=int(embd.shape[0]), block_size=values["gpt2.context_length"],
                         n_layer=n_layer, n_head=values["gpt2.attention.head_count"], n_embd=n_embd,
                         bias=_key(header, "numgpt.bias", True),
                         activation=_key(header, "numgpt.activation", "gelu_tanh"),
                         layer_norm_epsilon=_float32_value(
                             _key(header, "gpt2.attention.layer_norm_epsilon", 1e-5)),
                         dtype="float32")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _float32_value(v) -> float:
    """A float GGUF stored as float32, read back as the shortest decimal that rounds to it
    (1e-5, not 9.99999974738e-06), so a config survives the round trip unchanged."""
    return float(str(np.float32(v)))


def _tokenizer(header: _Header) -> tuple[object, list[str]]:
    model = _key(header, "tokenizer.ggml.model")
    if model is None:
        return None, ["the GGUF file has no tokenizer"]
    tokens = _key(header, "tokenizer.ggml.tokens")
    merges = _key(header, "tokenizer.ggml.merges") or []
    if _key(header, "numgpt.tokenizer") == "bytes":
        return ByteTokenizer(), []
    if model != "gpt2" or tokens is None:
        return None, [f"tokenizer model {model!r} is not GPT-2 BPE; no tokenizer attached"]
    n = len(tokens)
    while n and tokens[n - 1].startswith("[PAD"):  # numgpt's vocab padding
        n -= 1
    vocab = {t: i for i, t in enumerate(tokens[:n])}
    try:
        tok = GPT2Tokenizer(json.dumps(vocab, ensure_ascii=False),
                            "#version: 0.2\n" + "\n".join(merges) + "\n", name="gguf")
    except Exception as e:  # a tokenizer numgpt cannot rebuild should not block the weights
        return None, [f"the GGUF tokenizer could not be rebuilt ({e}); no tokenizer attached"]
    return tok, []


def read_chat_template(path: str | os.PathLike) -> str | None:
    """The chat template a GGUF file carries (``tokenizer.chat_template``), or None."""
    from .chat import check_template

    template = _key(_read_header(Path(path)), "tokenizer.chat_template")
    return None if template is None else check_template(
        template, f"{path}: 'tokenizer.chat_template'")


def read_tokenizer(path: str | os.PathLike) -> tuple[object, list[str]]:
    """The tokenizer a GGUF file carries, without reading its tensors: ``(tokenizer|None, notes)``."""
    return _tokenizer(_read_header(Path(path)))


def _q8(blocks: np.ndarray) -> quant.Q8Matrix:
    N, nb = blocks.shape
    return quant.Q8Matrix(np.ascontiguousarray(blocks["qs"]).reshape(N, nb * quant.BLOCK),
                          np.ascontiguousarray(blocks["d"]), take=True)


class _Read:
    """A tensor reader in numgpt's terms for ``io.checkpoint``'s model builders: ``shape``
    and ``dtype`` known from the header, ``source`` the GGUF tensor's name (for messages);
    calling it reads the array (or a ``Q8Matrix``)."""

    __slots__ = ("read", "shape", "dtype", "source")

    def __init__(self, read: Callable, shape: tuple, dtype: str, source: str):
        self.read, self.shape, self.dtype, self.source = read, tuple(shape), dtype, source

    def __call__(self):
        return self.read()


def read_gguf(path: str | os.PathLike) -> tuple[GPTConfig, dict, object, list[str], bool]:
    """A GPT-2 GGUF file's contents, checked against each other and the file's length, with
    nothing read beyond its header: ``(config, readers, tokenizer, notes, quantized)``.

    ``readers`` maps numgpt parameter names (and ``NAME.q8_0`` for the matrices of a q8_0
    file) to ``_Read`` objects whose ``shape`` is the numgpt shape; ``io.checkpoint`` builds
    the model from them through the same memory and finite checks as every other format."""
    path = Path(path)
    header = _read_header(path)
    config = _config(header)
    tokenizer, notes = _tokenizer(header)
    tensors = header.tensors
    every = tensor_names(config.n_layer)  # n_layer == the blocks the file holds
    names = every if config.bias else {k: v for k, v in every.items() if not k.endswith(".bias")}
    extra = sorted(set(tensors) - set(every.values()) - {"output.weight"})  # zero biases of a
    # bias-free model are in the file for llama.cpp and skipped here
    missing = sorted(v for v in names.values() if v not in tensors)
    if missing or extra:
        raise CheckpointError(f"{path}: GPT-2 tensors missing {missing[:8]}, unexpected {extra[:8]}")
    expected = config.parameter_shapes()
    for name, gguf_name in names.items():
        t, want = tensors[gguf_name], expected[name]
        found = t.shape[::-1] if _transposed(name) else t.shape
        if found != want:
            show = (lambda s: s[::-1]) if _transposed(name) else (lambda s: s)
            raise CheckpointError(f"{path}: shape mismatch for {gguf_name!r}: expected "
                                  f"{tuple(show(want))} (GGUF (out, in) layout), found "
                                  f"{tuple(t.shape)}; the weights do not match the header")
        if t.kind == "Q8_0" and not _is_matrix(name):  # q8_0 blocks are rows of a matrix
            raise CheckpointError(f"{path}: {gguf_name!r} is stored as q8_0; numgpt reads q8_0 "
                                  f"for the matrices only (LayerNorms, biases and position "
                                  f"embeddings are f32 or f16)")
    _check_output_tied(tensors.get("output.weight"), tensors["token_embd.weight"], path)
    matrices = [k for k in names if _is_matrix(k)]
    quantized = [k for k in matrices if tensors[names[k]].kind == "Q8_0"]
    if quantized and len(quantized) < len(matrices):
        notes.append(f"{len(matrices) - len(quantized)} float matrices were quantized to q8_0 "
                     f"on load to match the file's other {len(quantized)}")
    readers = {}
    for name, gguf_name in names.items():
        t = tensors[gguf_name]
        if quantized and _is_matrix(name):
            readers[f"{name}.q8_0"] = _Read(
                (lambda t=t: _q8(t())) if t.kind == "Q8_0"
                else (lambda t=t: quant.quantize_q8_0(_as_float(t, False))),
                t.shape, "q8_0", gguf_name)
        else:
            readers[name] = _Read(lambda t=t, tr=_transposed(name): _as_float(t, tr),
                                  expected[name], "float32", gguf_name)
    return config, readers, tokenizer, notes, bool(quantized)


def _transposed(name: str) -> bool:
    """Matrices GGUF stores (out, in) and numgpt (in, out): the block Linears, not wte."""
    return _is_matrix(name) and name != "wte.weight"


def _check_output_tied(head: _Tensor | None, embd: _Tensor, path: Path) -> None:
    """llama.cpp's converter may write ``output.weight``; numgpt ties the head to wte, so it
    must hold token_embd's type, shape and bytes exactly (both lie inside the file)."""
    if head is None:
        return
    if (head.code, head.shape) != (embd.code, embd.shape) or \
            not np.array_equal(head().view(np.uint8), embd().view(np.uint8)):
        raise CheckpointError(f"{path}: 'output.weight' differs from 'token_embd.weight'; numgpt "
                              f"ties the output head to the token embedding")


def _as_float(t: _Tensor, transpose: bool) -> np.ndarray:
    a = t()
    a = _q8(a).dequantize(np.float32) if t.kind == "Q8_0" else a.astype(np.float32)
    return a.T if transpose else a
