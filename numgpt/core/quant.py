"""8-bit weights for inference: GGML's q8_0 blocks and the compiled kernels that multiply by them.

Batch-1 decode reads every weight once per token, so in float32 its speed is capped by
memory bandwidth / (4 bytes x parameters). q8_0 stores each matrix in 1.0625 bytes per
weight and the kernels below multiply by it directly, never making a float32 copy.

The q8_0 layout (GGML's, so GGUF files carry it unchanged)
------------------------------------------------------------
A matrix W (N, K) -- N outputs, K inputs, the reduction axis last -- is cut along K into
blocks of ``BLOCK = 32`` values. Block ``b`` of row ``n`` stores 32 int8 codes
``qs[n, 32b:32b+32]`` in [-127, 127] and one scale ``d[n, b]``; it stands for
``d[n, b] * qs[n, 32b + j]``. Every quantized matrix here is stored (out, in) = (N, K) like
GGML's: a numgpt ``Linear`` weight (in, out) is quantized transposed, the tied ``wte``
(V, C) is already (out, in) for the head and gives embedding rows directly.

Scales are float16, on disk and in memory, as in GGML: 1.0625 bytes per weight, and a numgpt
q8_0 file and a GGUF q8_0 tensor hold the same bytes, so they convert losslessly both ways.
numba has no float16 type, so the kernels read a scale's 16 bits and widen them through a
65536-entry float32 table (``_HALF_TO_FLOAT``, 256 KB, exact). Quantization picks
``d = max|w| / 127`` rounded UP to the next float16, then ``q = round(w / d)``: rounding d
up (GGML rounds to nearest) keeps every ``|w / d| <= 127`` so no code is clipped, and the
error of every value is at most ``d / 2``. GGML reads such blocks like its own.

Which kernel runs (``matmul``)
------------------------------
* M <= ``SMALL_M`` rows of activations (batch-1 decode, the server's batched decode):
  ``q8_matmul_rows``, a numba kernel with ``prange`` over groups of 4 output rows (one
  thread when the product is under ``SERIAL_MACS`` multiply-adds), whose codes are
  interleaved in memory so a matrix streams as one sequence (``Q8Matrix``); each
  block's 32 int8 codes are widened to float32, multiplied with the activations and summed
  in float32, then scaled once per block. Bandwidth: int8 loads only.
* M > ``SMALL_M`` (prefill, perplexity): compute-bound, so the matrix is dequantized one
  tile of ``TILE_ELEMENTS`` weights at a time into a reused float32 buffer (1 MB, never
  the whole matrix) and multiplied by BLAS, as GGML's BLAS backend does for batches.

Why float32 activations (llama.cpp quantizes them to int8 too and uses integer dot
products, faster still): the kernel then computes exactly ``x @ dequantize(W)^T``
to float32 rounding, the gate the tests hold it to; the weights are the only approximation.

Both are exact for the numbers stored: q * d is exact in float32 (8-bit times 11-bit
significands), so the only rounding is float32 accumulation (tests/test_quant.py).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..errors import CheckpointError, ConfigError, DTypeError, ShapeError
from .nn import Linear, Module, Parameter
from .tensor import Tensor

__all__ = ["BLOCK", "SCHEMES", "Q8Matrix", "quantize_q8_0", "matmul", "linear", "embedding",
           "QuantizedLinear", "QuantizedEmbedding", "quantize_model", "is_quantized",
           "scheme_of", "quantized_state", "build_quantized", "weight_bytes", "parameter_count",
           "bytes_per_parameter", "stored_shapes",
           "describe", "dequantize_model", "refuse_training"]

BLOCK = 32  # values per q8_0 block (GGML's QK8_0)
SCHEMES = ("q8_0",)
SMALL_M = 16  # up to this many activation rows the direct kernel beats dequantize + BLAS
SERIAL_MACS = 1 << 18  # below this many multiply-adds one thread does the whole matmul
TILE_ELEMENTS = 1 << 18  # weights dequantized per BLAS tile (1 MB of float32, stays in L2)
_FASTMATH = {"reassoc", "contract", "nsz"}  # reassociation lets LLVM vectorize the sums


# --------------------------------------------------------------------- the format

class Q8Matrix:
    """A matrix W (N, K) in q8_0 blocks: codes (N, K) int8 and ``scales`` (N, K // 32)
    float16, ``W[n, k] = scales[n, k // 32] * codes[n, k]``.

    In memory the codes of each group of 4 rows are interleaved block by block (GGML's
    "repacked" CPU layout): ``packed[g, b, r, :]`` are the 32 codes of block b of row
    4g + r, so the kernel reads the 4 rows' block b as 128 contiguous bytes and the whole
    matrix as one sequential stream (4 separate row streams defeat the hardware prefetcher:
    twice slower). The last ``N % 4`` rows (``tail``) stay row by row. ``qs`` gives the
    plain (N, K) codes back (a copy), which files store.
    """

    __slots__ = ("data", "scales")
    scheme = "q8_0"

    def __init__(self, qs: np.ndarray, scales: np.ndarray, *, take: bool = False):
        """``qs`` (N, K) int8 codes row by row. ``take=True`` interleaves them in place (the
        caller gives the array up: loaders, so no second copy is made); otherwise a copy."""
        if qs.dtype != np.int8 or qs.ndim != 2 or qs.shape[1] % BLOCK:
            raise ShapeError(f"q8_0 codes must be int8 (N, K) with K a multiple of {BLOCK}, "
                             f"got {qs.dtype} {qs.shape}")
        if scales.shape != (qs.shape[0], qs.shape[1] // BLOCK):
            raise ShapeError(f"q8_0 scales must be {(qs.shape[0], qs.shape[1] // BLOCK)} for codes "
                             f"{qs.shape}, got {scales.shape}")
        if scales.dtype != np.float16:
            raise DTypeError(f"q8_0 scales must be float16 (GGML's), got {scales.dtype}")
        self.data = qs if (take and qs.flags.c_contiguous) else np.array(qs, order="C")
        _interleave_groups(self.data)
        self.scales = np.ascontiguousarray(scales)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def groups(self) -> int:
        return self.data.shape[0] // 4

    @property
    def packed(self) -> np.ndarray:
        """(N // 4, K / 32, 4, 32) int8 view: block b of row 4g + r at ``[g, b, r]``."""
        N, K = self.shape
        return self.data[:4 * self.groups].reshape(self.groups, K // BLOCK, 4, BLOCK)

    @property
    def tail(self) -> np.ndarray:
        """The last N % 4 rows, (N % 4, K) int8, row by row."""
        return self.data[4 * self.groups:]

    @property
    def qs(self) -> np.ndarray:
        """The codes row by row, (N, K) int8 (a copy: what files store)."""
        N, K = self.shape
        rows = self.packed.transpose(0, 2, 1, 3).reshape(4 * self.groups, K)  # (4G, K)
        return np.concatenate([rows, self.tail])

    @property
    def nbytes(self) -> int:
        """Bytes in memory, on disk and in GGUF: one int8 per weight + one float16 per block."""
        return self.data.nbytes + self.scales.nbytes

    def dequantize(self, dtype=np.float64) -> np.ndarray:
        """The full matrix W (N, K) the blocks stand for. For tests and export only:
        inference never calls it (that would be the float copy q8_0 exists to avoid)."""
        N, K = self.shape
        blocks = self.qs.reshape(N, K // BLOCK, BLOCK).astype(dtype)  # (N, K/32, 32)
        return (blocks * self.scales[..., None].astype(dtype)).reshape(N, K)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows ``W[ids]``: ids (...) -> (..., K) float32 (only those rows)."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        N, K = self.shape
        G = self.groups
        q = np.empty((len(flat), K // BLOCK, BLOCK), np.int8)  # (n, K/32, 32)
        grouped = flat < 4 * G
        g_ids = flat[grouped]
        q[grouped] = self.packed[g_ids // 4, :, g_ids % 4]  # (n_g, K/32, 32)
        q[~grouped] = self.tail[flat[~grouped] - 4 * G].reshape(-1, K // BLOCK, BLOCK)
        d = self.scales[flat].astype(np.float32)[..., None]  # (n, K/32, 1)
        return (q * d).reshape(*ids.shape, K)  # int8 * float32 -> float32, exact


def _interleave_groups(data: np.ndarray, groups_per_chunk: int = 1024) -> None:
    """Reorder the codes of each group of 4 rows of ``data`` (N, K) in place from (row, block,
    32) to (block, row, 32), a chunk of groups at a time (a temporary of one chunk)."""
    N, K = data.shape
    flat = data.reshape(-1)  # a view: data is C-contiguous
    for g0 in range(0, N // 4, groups_per_chunk):
        g1 = min(N // 4, g0 + groups_per_chunk)
        chunk = flat[4 * g0 * K:4 * g1 * K]
        chunk[...] = chunk.reshape(g1 - g0, 4, K // BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(-1)


def _float16_scale_up(amax: np.ndarray) -> np.ndarray:
    """``amax / 127`` rounded up to a float16, so ``|w| / d <= 127`` exactly."""
    d = (amax.astype(np.float64) / 127.0)
    d16 = d.astype(np.float16)
    low = d16.astype(np.float64) < d
    d16[low] = np.nextafter(d16[low], np.float16(np.inf))
    if not np.all(np.isfinite(d16)):
        raise ConfigError(f"a weight of magnitude {float(amax.max()):.3g} exceeds what q8_0 can "
                          f"store (scale above float16's 65504); the model is not quantizable")
    return d16


def quantize_q8_0(w: np.ndarray, rows_per_chunk: int = 4096) -> Q8Matrix:
    """W (N, K) float -> q8_0 blocks along K. Error of every value <= its block's scale / 2.

    Works ``rows_per_chunk`` rows at a time so a float64 temporary stays small.
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ConfigError(f"q8_0 needs matrices whose input width is a multiple of {BLOCK}; got "
                          f"shape {w.shape} (n_embd must be a multiple of {BLOCK})")
    N, K = w.shape
    qs = np.empty((N, K), np.int8)
    scales = np.empty((N, K // BLOCK), np.float16)
    for r0 in range(0, N, rows_per_chunk):
        blocks = w[r0:r0 + rows_per_chunk].astype(np.float64).reshape(-1, K // BLOCK, BLOCK)
        d = _float16_scale_up(np.abs(blocks).max(axis=-1))  # (n, K/32)
        safe = np.where(d > 0, d, 1.0).astype(np.float64)[..., None]  # an all-zero block stays 0
        q = np.clip(np.rint(blocks / safe), -127, 127)  # |q| <= 127 anyway: d was rounded up
        qs[r0:r0 + len(blocks)] = q.reshape(-1, K).astype(np.int8)
        scales[r0:r0 + len(blocks)] = d
    return Q8Matrix(qs, scales, take=True)


# ----------------------------------------------------------------------- kernels

def _njit(**options):
    import numba  # imported on first use, so float-only programs never pay for it

    from .threads import let_openmp_threads_sleep

    let_openmp_threads_sleep()  # before numba's pool starts: spinning threads starve BLAS

    return numba.njit(cache=True, **options)


_kernels: dict[str, Callable] = {}
# float16 bits -> float32 value, for all 65536 patterns: numba reads scales through it
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _kernel(name: str) -> Callable:
    """The compiled kernel ``name``, built (or read from numba's cache) on first use."""
    if name not in _kernels:
        _kernels[name] = _BUILDERS[name]()
    return _kernels[name]


def _build_matmul_rows(parallel: bool = True):
    import numba

    @_njit(parallel=parallel, fastmath=_FASTMATH)
    def q8_matmul_rows(x, packed, tail, scale_bits, half, out):
        """out = x @ W^T for W in q8_0 blocks (reference: ``x @ Q8Matrix.dequantize().T``).

        x (M, K) f32; packed (G, K/32, 4, 32) i8: block b of row 4g + r at [g, b, r];
        tail (N - 4G, K) i8; scale_bits (N, K/32) u16 (float16 bits, widened by ``half``,
        65536 f32); out (M, N) f32. prange over the groups of 4 rows: the group's block b is
        128 contiguous bytes, each widened to float32 and multiplied with the block's 32
        activations (shared by the 4 rows), summed in float32 and scaled once per block.
        A group is read from memory once for all M rows of x (it stays in L1)."""
        M, K = x.shape
        G, n_blocks = packed.shape[0], packed.shape[1]
        for g in numba.prange(G):
            n = 4 * g
            for m in range(M):
                xm = x[m]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for b in range(n_blocks):
                    block = packed[g, b]  # (4, 32)
                    base = 32 * b
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for j in range(32):
                        xv = xm[base + j]
                        s0 += np.float32(block[0, j]) * xv
                        s1 += np.float32(block[1, j]) * xv
                        s2 += np.float32(block[2, j]) * xv
                        s3 += np.float32(block[3, j]) * xv
                    a0 += half[scale_bits[n, b]] * s0
                    a1 += half[scale_bits[n + 1, b]] * s1
                    a2 += half[scale_bits[n + 2, b]] * s2
                    a3 += half[scale_bits[n + 3, b]] * s3
                out[m, n] = a0
                out[m, n + 1] = a1
                out[m, n + 2] = a2
                out[m, n + 3] = a3
        for t in range(tail.shape[0]):  # the last N % 4 rows, row by row
            r = 4 * G + t
            row = tail[t]
            for m in range(M):
                xm = x[m]
                acc = np.float32(0.0)
                for b in range(n_blocks):
                    s = np.float32(0.0)
                    for j in range(32 * b, 32 * b + 32):
                        s += np.float32(row[j]) * xm[j]
                    acc += half[scale_bits[r, b]] * s
                out[m, r] = acc

    return q8_matmul_rows


def _build_dequantize_rows():
    import numba

    @_njit(parallel=True)
    def q8_dequantize_rows(packed, tail, scale_bits, half, r0, out):
        """Rows r0 .. r0+R of W into ``out`` (R, K) f32 (one BLAS tile; reference:
        ``Q8Matrix.dequantize``). Same arguments as ``q8_matmul_rows``."""
        R, K = out.shape
        G = packed.shape[0]
        for i in numba.prange(R):
            r = r0 + i
            dst = out[i]
            for b in range(K // 32):
                d = half[scale_bits[r, b]]
                if r < 4 * G:
                    src = packed[r // 4, b, r % 4]  # (32,)
                    for j in range(32):
                        dst[32 * b + j] = d * np.float32(src[j])
                else:
                    row = tail[r - 4 * G]
                    for j in range(32):
                        dst[32 * b + j] = d * np.float32(row[32 * b + j])

    return q8_dequantize_rows


_BUILDERS = {"matmul_rows": _build_matmul_rows,
             "matmul_rows_serial": lambda: _build_matmul_rows(parallel=False),
             "dequantize_rows": _build_dequantize_rows}


def _matmul_tiled(x2: np.ndarray, w: Q8Matrix, out: np.ndarray) -> None:
    """out (M, N) = x2 (M, K) @ W^T through float32 tiles of W and BLAS (for large M)."""
    N, K = w.shape
    tile_rows = max(4, TILE_ELEMENTS // K)
    buf = np.empty((min(tile_rows, N), K), np.float32)  # the one float32 tile, reused
    dequantize_rows = _kernel("dequantize_rows")
    for r0 in range(0, N, tile_rows):
        tile = buf[:min(tile_rows, N - r0)]  # (R, K)
        dequantize_rows(w.packed, w.tail, w.scales.view(np.uint16), _HALF_TO_FLOAT, r0, tile)
        np.matmul(x2, tile.T, out=out[:, r0:r0 + len(tile)])  # (M, K) @ (K, R) -> (M, R)


def matmul(x: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """``x @ W^T``: x (..., K) float32, W (N, K) in q8_0 -> (..., N) float32."""
    N, K = w.shape
    if x.shape[-1] != K:
        raise ShapeError(f"quantized matmul: input {x.shape} does not match weight (out, in) {w.shape}")
    if x.dtype != np.float32:
        raise ShapeError(f"quantized matmul takes float32 activations, got {x.dtype}")
    x2 = np.ascontiguousarray(x.reshape(-1, K))  # (M, K)
    out = np.empty((x2.shape[0], N), np.float32)  # (M, N)
    if x2.shape[0] <= SMALL_M:
        small = x2.shape[0] * N * K < SERIAL_MACS  # waking threads would cost more than the work
        _kernel("matmul_rows_serial" if small else "matmul_rows")(
            x2, w.packed, w.tail, w.scales.view(np.uint16), _HALF_TO_FLOAT, out)
    else:
        _matmul_tiled(x2, w, out)
    return out.reshape(*x.shape[:-1], N)


def linear(x: np.ndarray, w: Q8Matrix, b: np.ndarray | None = None) -> np.ndarray:
    """``x @ W^T + b`` for a quantized (out, in) W: x (..., in) -> (..., out)."""
    y = matmul(x, w)
    if b is not None:
        y += b
    return y


def embedding(w: Q8Matrix, ids: np.ndarray) -> np.ndarray:
    """Rows of a quantized (V, C) table: ids (...) -> (..., C) float32, only those rows."""
    return w.rows(ids)


# ------------------------------------------------------------------------ layers

class QuantizedLinear(Module):
    """Inference-only ``Linear``: ``y = x @ W + b`` with W held as q8_0 blocks of W^T (out, in).

    ``bias`` stays a float32 ``Parameter`` (so ``parameters()`` lists it); the weight is
    not a Parameter: it has no gradient and is never trained.
    """

    def __init__(self, weight: Q8Matrix, bias: Parameter | None):
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(cls, layer: Linear) -> "QuantizedLinear":
        w = layer.weight.data  # (in, out)
        bias = None if layer.bias is None else Parameter(layer.bias.data.astype(np.float32))
        return cls(quantize_q8_0(w.T), bias)  # blocks along "in": (out, in)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return Tensor(linear(x.data, self.weight, None if self.bias is None else self.bias.data))


class QuantizedEmbedding(Module):
    """Inference-only token table (V, C) in q8_0: looks up rows and serves as the tied head."""

    def __init__(self, weight: Q8Matrix):
        self.weight = weight

    def forward(self, ids: np.ndarray) -> Tensor:  # (...) int -> (..., C)
        return Tensor(embedding(self.weight, ids))

    def head(self, x: Tensor) -> Tensor:  # (..., C) -> (..., V): logits = x @ wte^T
        return Tensor(matmul(x.data, self.weight))


# ------------------------------------------------------------------------- model

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _linear_slots(model):
    """(owner module, attribute, full name) of every matrix weight in the blocks."""
    for i, block in enumerate(model.h):
        for path in _LINEARS:
            owner_name, attr = path.split(".")
            yield getattr(block, owner_name), attr, f"h.{i}.{path}"


def is_quantized(model) -> bool:
    return isinstance(getattr(model, "wte", None), QuantizedEmbedding)


def scheme_of(model) -> str | None:
    """``"q8_0"`` for a quantized model, None for a float one."""
    return model.wte.weight.scheme if is_quantized(model) else None


def quantize_model(model, scheme: str = "q8_0"):
    """Replace every matrix weight of ``model`` (in place) by q8_0 blocks; returns it.

    LayerNorms, biases and ``wpe`` stay float32 (a float64 model's are cast: a quantized
    model computes in float32). The float matrices are dropped, so their memory is freed.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if is_quantized(model):
        raise ConfigError(f"the model is already quantized ({scheme_of(model)}); quantize the "
                          f"float checkpoint it came from")
    if model.config.n_embd % BLOCK:
        raise ConfigError(f"q8_0 needs n_embd to be a multiple of {BLOCK}, got {model.config.n_embd}")
    for owner, attr, _ in _linear_slots(model):
        setattr(owner, attr, QuantizedLinear.from_linear(getattr(owner, attr)))
    model.wte = QuantizedEmbedding(quantize_q8_0(model.wte.weight.data))  # (V, C) is (out, in)
    for p in model.parameters().values():  # what is left: LayerNorms, biases, wpe
        p.data = p.data.astype(np.float32, copy=False)
    model.config.dtype = "float32"
    return model


def quantized_state(model) -> dict[str, np.ndarray]:
    """What a quantized checkpoint stores: float32 parameters by name, and for each matrix
    ``NAME.qs`` (out, in) int8 + ``NAME.scales`` (out, in/32) float16."""
    state = {name: np.asarray(p.data, order="C") for name, p in model.parameters().items()}
    matrices = [(f"{name}.weight", getattr(owner, attr).weight)
                for owner, attr, name in _linear_slots(model)]
    matrices.append(("wte.weight", model.wte.weight))
    for name, w in matrices:
        state[f"{name}.qs"] = w.qs
        state[f"{name}.scales"] = w.scales
    return state


def build_quantized(model, read: Mapping[str, Callable[[], np.ndarray]], where: str):
    """Fill a fresh ``GPT(config, seed=None)`` from a quantized state (see ``quantized_state``).

    The model's float matrices are replaced before anything is written into them, so
    their pages (``np.zeros``: untouched, never resident) do not add to peak memory.
    ``read`` maps each stored name to a function returning its array; keys and shapes are
    checked, naming ``where`` in the error.
    """
    c = model.config
    wanted = {f"{name}.weight": (owner, attr) for owner, attr, name in _linear_slots(model)}
    for name, (owner, attr) in wanted.items():
        out_in = getattr(owner, attr).weight.data.shape[::-1]  # Linear is (in, out)
        q = _read_q8(read, name, out_in, where)
        bias = getattr(owner, attr).bias
        setattr(owner, attr, QuantizedLinear(q, bias))
    model.wte = QuantizedEmbedding(_read_q8(read, "wte.weight", (c.vocab_size, c.n_embd), where))
    params = model.parameters()
    stored = {k for k in read if not k.endswith((".qs", ".scales", ".q8_0"))}
    missing, unexpected = sorted(set(params) - stored), sorted(stored - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{where}: quantized checkpoint keys do not match the config: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, p in params.items():
        a = read[name]()
        if a.shape != p.data.shape:
            raise CheckpointError(f"{where}: shape mismatch for {name!r}: expected "
                                  f"{tuple(p.data.shape)}, found {tuple(a.shape)}")
        p.data[...] = a
    return model


def stored_shapes(config) -> dict[str, tuple[int, ...]]:
    """What ``quantized_state`` stores for ``config``, by name and shape, without allocating:
    ``NAME.qs`` (out, in) and ``NAME.scales`` (out, in/32) for each matrix (the block
    Linears and wte), the config's own shape for every float parameter. Loaders check a
    file's header against it before the model exists."""
    out: dict[str, tuple[int, ...]] = {}
    matrices = {f"{name}.weight" for name in (f"h.{i}.{path}" for i in range(config.n_layer)
                                              for path in _LINEARS)} | {"wte.weight"}
    for name, shape in config.parameter_shapes().items():
        if name in matrices:
            N, K = shape if name == "wte.weight" else shape[::-1]  # Linear (in, out) -> (out, in)
            out[f"{name}.qs"], out[f"{name}.scales"] = (N, K), (N, K // BLOCK)
        else:
            out[name] = tuple(shape)
    return out


def _read_q8(read, name: str, shape: tuple[int, int], where: str) -> Q8Matrix:
    """The matrix ``name`` from ``read``: a ready ``Q8Matrix`` under ``NAME.q8_0`` (GGUF), or
    its codes and scales under ``NAME.qs`` / ``NAME.scales`` (numgpt checkpoints)."""
    want = (tuple(shape), (shape[0], shape[1] // BLOCK))
    if f"{name}.q8_0" in read:
        m = read[f"{name}.q8_0"]()
        if m.shape != want[0]:
            raise CheckpointError(f"{where}: {name!r} is {m.shape}, expected {want[0]}")
        return m
    for key in (f"{name}.qs", f"{name}.scales"):
        if key not in read:
            raise CheckpointError(f"{where}: quantized checkpoint lacks {key!r}")
    qs, scales = read[f"{name}.qs"](), read[f"{name}.scales"]()
    if qs.dtype != np.int8 or tuple(qs.shape) != want[0] or tuple(scales.shape) != want[1]:
        raise CheckpointError(f"{where}: {name!r} q8_0 blocks have codes {qs.dtype} {qs.shape} and "
                              f"scales {scales.shape}; expected int8 {want[0]} and {want[1]}")
    return Q8Matrix(qs, scales, take=True)  # read fresh from the file: interleaved in place


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the weights in memory, split into quantized matrices and float parameters."""
    q = 0
    if is_quantized(model):
        q = model.wte.weight.nbytes + sum(getattr(o, a).weight.nbytes
                                          for o, a, _ in _linear_slots(model))
    f = sum(p.data.nbytes for p in model.parameters().values())
    return {"quantized": q, "float": f, "total": q + f}


def dequantize_model(model):
    """A float32 model holding the values a quantized model's blocks stand for, for writing
    formats that have no q8_0 (a Hugging Face folder). Export only: inference never needs it."""
    # the model's own class builds the copy: model.py imports this module, so importing GPT
    # here would make the two import each other
    out = type(model)(model.config.__class__.from_dict(model.config.to_dict()), seed=None)
    params = out.parameters()
    for name, p in model.parameters().items():
        params[name].data[...] = p.data
    out.wte.weight.data[...] = model.wte.weight.dequantize(np.float32)
    for owner, attr, name in _linear_slots(model):
        params[f"{name}.weight"].data[...] = getattr(owner, attr).weight.dequantize(np.float32).T
    out.tokenizer = model.tokenizer
    out.source = getattr(model, "source", None)
    return out


def parameter_count(model) -> int:
    """Every weight of the model, quantized or not (``num_parameters`` counts float ones)."""
    n = model.num_parameters()
    if is_quantized(model):
        n += model.wte.weight.data.size + sum(getattr(o, a).weight.data.size for o, a, _ in _linear_slots(model))
    return n


def bytes_per_parameter(config, scheme: str = "q8_0") -> float:
    """Average bytes per parameter of ``config`` quantized with ``scheme``, by arithmetic alone
    (so a loader can check memory before allocating): the block matrices and the tied
    ``wte`` at 1 + 2/BLOCK bytes per weight, everything else float32."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {list(SCHEMES)}")
    C, total = config.n_embd, config.parameter_count()
    matrices = config.n_layer * 12 * C * C + config.vocab_size * C
    return (matrices * (1 + 2 / BLOCK) + (total - matrices) * 4) / total


def describe(model) -> dict | None:
    """What a checkpoint records and ``numgpt info`` prints about the scheme; None if float."""
    if not is_quantized(model):
        return None
    sizes = weight_bytes(model)
    return {"scheme": scheme_of(model), "block_size": BLOCK, "scale_dtype": "float16",
            "layout": "(out, in) matrices, blocks along in", "bytes": sizes["total"],
            "quantized_bytes": sizes["quantized"], "float_bytes": sizes["float"]}


def refuse_training(model, what: str = "training") -> None:
    """ConfigError if ``model`` is quantized: its weights are inference-only."""
    if is_quantized(model):
        raise ConfigError(f"this model's weights are quantized ({scheme_of(model)}), which is "
                          f"inference-only; {what} needs float weights: use the float32 "
                          f"checkpoint it was quantized from")
