"""GGUF in and out, in llama.cpp's GPT-2 layout, through the ``gguf`` package (GGUFWriter /
GGUFReader, published by llama.cpp): numgpt never writes the binary format by hand.

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

``load_gguf`` reads GPT-2 GGUF files from numgpt or from llama.cpp's converter (f32, f16,
q8_0 tensors; an ``output.weight`` is accepted only if it equals ``token_embd``); q8_0
matrices stay quantized (``numgpt.core.quant``). Tensor data is read with ``np.fromfile``
at the offsets GGUFReader reports, not through its memory map, so the file's pages do not
add to the process's peak memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..core import quant
from ..core.model import GPT, GPTConfig
from ..errors import CheckpointError, ConfigError
from .tokenizer import ByteTokenizer, GPT2Tokenizer, bytes_to_unicode

__all__ = ["write_gguf", "load_gguf", "read_tokenizer", "GGUF_DTYPES", "tensor_names"]

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


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
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
        _add_tokenizer(writer, model.tokenizer, c.vocab_size)
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
    """``write(temp)`` into a temporary file beside ``path``, then rename it into place."""
    from .files import fsync_path, temp_path

    tmp = temp_path(path)
    try:
        write(str(tmp))
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

def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config(reader, path: Path, shapes: dict[str, tuple]) -> GPTConfig:
    arch = _field(reader, "general.architecture")
    if arch != "gpt2":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; numgpt reads GPT-2 "
                              f"GGUF files only (architecture 'gpt2')")
    need = ["gpt2.context_length", "gpt2.embedding_length", "gpt2.block_count",
            "gpt2.attention.head_count"]
    missing = [k for k in need if k not in reader.fields]
    if missing or "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: missing GPT-2 keys {missing or ['token_embd.weight']}")
    n_embd = int(_field(reader, "gpt2.embedding_length"))
    ff = int(_field(reader, "gpt2.feed_forward_length", 4 * n_embd))
    if ff != 4 * n_embd:
        raise CheckpointError(f"{path}: feed_forward_length {ff} is not 4 x embedding_length "
                              f"({4 * n_embd}); numgpt's GPT-2 MLP is 4x wide")
    try:
        return GPTConfig(vocab_size=int(shapes["token_embd.weight"][0]),
                         block_size=int(_field(reader, "gpt2.context_length")),
                         n_layer=int(_field(reader, "gpt2.block_count")),
                         n_head=int(_field(reader, "gpt2.attention.head_count")), n_embd=n_embd,
                         bias=bool(_field(reader, "numgpt.bias", True)),
                         activation=str(_field(reader, "numgpt.activation", "gelu_tanh")),
                         layer_norm_epsilon=_float32_value(_field(reader, "gpt2.attention.layer_norm_epsilon", 1e-5)),
                         dtype="float32")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _float32_value(v) -> float:
    """A float GGUF stored as float32, read back as the shortest decimal that rounds to it
    (1e-5, not 9.99999974738e-06), so a config survives the round trip unchanged."""
    return float(str(np.float32(v)))


def _tokenizer(reader, path: Path) -> tuple[object, list[str]]:
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return None, ["the GGUF file has no tokenizer"]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if _field(reader, "numgpt.tokenizer") == "bytes":
        return ByteTokenizer(), []
    if model != "gpt2" or tokens is None:
        return None, [f"tokenizer model {model!r} is not GPT-2 BPE; no tokenizer attached"]
    merges = _field(reader, "tokenizer.ggml.merges") or []
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


def read_tokenizer(path: str | os.PathLike) -> tuple[object, list[str]]:
    """The tokenizer a GGUF file carries, without reading its tensors: ``(tokenizer|None, notes)``."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return _tokenizer(reader, Path(path))


def _reader_for(tensor, path: Path) -> Callable[[], np.ndarray]:
    """A function reading one tensor's data from the file: float32 (N, K) / (n,) arrays,
    or for q8_0 the structured blocks (N, K/32)."""
    import gguf

    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    shape = tuple(int(s) for s in reversed(tensor.shape))  # ggml ne -> numpy order
    offset, n_bytes = int(tensor.data_offset), int(tensor.n_bytes)
    dtypes = {gguf.GGMLQuantizationType.F32: np.dtype("<f4"),
              gguf.GGMLQuantizationType.F16: np.dtype("<f2"),
              gguf.GGMLQuantizationType.Q8_0: _Q8_BLOCK}
    if kind not in dtypes:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} is {kind.name}; numgpt reads F32, "
                              f"F16 and Q8_0 GGUF tensors (re-convert with --outtype f32/f16/q8_0)")
    dt = dtypes[kind]
    blocks_shape = (*shape[:-1], shape[-1] // quant.BLOCK) if kind == gguf.GGMLQuantizationType.Q8_0 else shape

    def read() -> np.ndarray:
        a = np.fromfile(path, dtype=dt, count=n_bytes // dt.itemsize, offset=offset)
        return a.reshape(blocks_shape)

    read.kind, read.shape = kind.name, shape
    return read


def _q8(blocks: np.ndarray) -> quant.Q8Matrix:
    N, nb = blocks.shape
    return quant.Q8Matrix(np.ascontiguousarray(blocks["qs"]).reshape(N, nb * quant.BLOCK),
                          np.ascontiguousarray(blocks["d"]), take=True)


def load_gguf(path: str | os.PathLike) -> GPT:
    """A GPT-2 GGUF file -> GPT (q8_0 matrices stay quantized). Sets ``model.source``."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    by_name = {t.name: _reader_for(t, path) for t in reader.tensors}
    config = _config(reader, path, {k: r.shape for k, r in by_name.items()})
    tokenizer, notes = _tokenizer(reader, path)
    del reader  # drop the memory map; tensors are read with fromfile below
    every = tensor_names(config.n_layer)
    names = every if config.bias else {k: v for k, v in every.items() if not k.endswith(".bias")}
    extra = sorted(set(by_name) - set(every.values()) - {"output.weight"})  # zero biases of a
    # bias-free model are in the file for llama.cpp and skipped here
    missing = sorted(v for v in names.values() if v not in by_name)
    if missing or extra:
        raise CheckpointError(f"{path}: GPT-2 tensors missing {missing[:8]}, unexpected {extra[:8]}")
    _check_output_tied(by_name, path)
    matrices = [k for k in names if _is_matrix(k)]
    quantized = [k for k in matrices if by_name[names[k]].kind == "Q8_0"]
    model = GPT(config, seed=None)
    if quantized:
        if len(quantized) < len(matrices):
            notes.append(f"{len(matrices) - len(quantized)} float matrices were quantized to q8_0 "
                         f"on load to match the file's other {len(quantized)}")
        read = _quantized_reads(by_name, names)
        quant.build_quantized(model, read, str(path))
    else:
        _fill_float(model, by_name, names, path)
    model.tokenizer = tokenizer
    model.source = {"format": "gguf", "path": str(path), "weights": str(path), "notes": notes}
    return model


def _check_output_tied(by_name: dict, path: Path) -> None:
    """llama.cpp's converter may write ``output.weight``; numgpt ties the head to wte."""
    head = by_name.get("output.weight")
    if head is None:
        return
    a, b = head(), by_name["token_embd.weight"]()
    if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
        raise CheckpointError(f"{path}: 'output.weight' differs from 'token_embd.weight'; numgpt "
                              f"ties the output head to the token embedding")


def _as_float(read: Callable, transpose: bool) -> np.ndarray:
    a = read()
    a = _q8(a).dequantize(np.float32) if read.kind == "Q8_0" else a.astype(np.float32)
    return a.T if transpose else a


def _fill_float(model: GPT, by_name: dict, names: dict, path: Path) -> None:
    for name, p in model.parameters().items():
        a = _as_float(by_name[names[name]], transpose=_is_matrix(name) and name != "wte.weight")
        if a.shape != p.data.shape:
            raise CheckpointError(f"{path}: {names[name]!r} has shape {a.shape[::-1] if _is_matrix(name) else a.shape}, "
                                  f"expected {p.data.shape[::-1] if _is_matrix(name) else p.data.shape}")
        p.data[...] = a


def _quantized_reads(by_name: dict, names: dict) -> dict[str, Callable[[], np.ndarray]]:
    """The ``quant.build_quantized`` view of a GGUF: NAME.q8_0 -> Q8Matrix for matrices
    (float ones quantized), float32 arrays for the rest."""
    read: dict[str, Callable] = {}
    for name, gguf_name in names.items():
        r = by_name[gguf_name]
        if not _is_matrix(name):
            read[name] = lambda r=r: _as_float(r, transpose=False)
            continue

        def matrix(r=r) -> quant.Q8Matrix:
            return _q8(r()) if r.kind == "Q8_0" else quant.quantize_q8_0(_as_float(r, False))

        read[f"{name}.q8_0"] = matrix
    return read
