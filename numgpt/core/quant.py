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

Which kernel runs (``matmul``, decided in one place: ``kernel_for``, printed by ``kernel_plan``
and ``numgpt info``)
------------------------------------------------------------------------------------------
* M <= ``DIRECT_MAX_M`` (1) row, batch-1 decode: ``q8_matmul_direct``. ``prange`` over groups
  of 4 output rows whose codes are interleaved block by block (``Q8Matrix``), so the matrix
  streams as one sequence; each block's 32 codes are widened to float32, multiplied with the
  32 activations and summed, then scaled once per block. Bandwidth: int8 loads only.
* 2 .. ``STRIPS_MAX_M`` (64) rows, the server's batched decode step: ``q8_matmul_strips``.
  Each thread widens one group of 4 weight rows at a time into a (4, K) float32 strip (in
  L1/L2: each weight block is read from memory once per step and widened once, not once
  per row), then runs 2 rows of x against the 4 strip rows with 8 accumulators over the
  whole of K (no per-block horizontal sums); x passes are ``ROW_TILE_BYTES`` so they stay
  in L2. 2 x 4: 8 accumulators + 6 operands fit AVX2's 16 vector registers (4 x 4 measured
  25% faster at K = 3072 on this AVX-512 EPYC, equal at K = 768, and would spill on AVX2).
* M > ``STRIPS_MAX_M`` (prefill, perplexity): compute-bound, so the matrix is dequantized one
  tile of ``TILE_ELEMENTS`` weights at a time into a reused float32 buffer (1 MB, never the
  whole matrix) and multiplied by BLAS, as GGML's BLAS backend does for large batches.
The crossovers were measured on a shared 2-vCPU AMD EPYC (2 threads, min of 9 calls, the
weights in cache; benchmarks/bench_quant.py prints them per CPU): direct vs strips tie at 2
rows (0.24 ms both at 768 x 2304; the head 50257 x 768 9.4 vs 6.8 ms), strips win from 3;
strips beat the BLAS tiles up to 64 rows at every shape (768 x 2304: 2.3 vs 2.6 ms; 3072 x 768:
5.3 vs 8.3; head: 52 vs 82), at 96 rows the two are level or the tiles win.

The machine code, and why the kernels are written the way they are
------------------------------------------------------------------
numba hands LLVM plain loops, so which loop gets vectorised is LLVM's choice; the
assembly (``inspect_asm`` of the serial build; tests/test_quant_kernels.py checks it for
this CPU and compiles for haswell/znver3 (AVX2) and skylake-avx512/icelake-server (AVX-512)
in subprocesses) shows what it chose. The kernel before this one indexed ``packed[g, b]``
(a 4-d view) and had a one-row tail loop of 32 constant steps: LLVM unrolled that 32-step
loop completely and vectorised the *block* loop instead, 32 codes apart, building vectors
byte by byte: 1184 ``vpinsrb`` and 163 gathers on this EPYC (1120 and 165 for
skylake-avx512) beside the vector code, a loop whose cost is its instruction count (the
Xeon's 22 ms per token for 132 MB). Now every block is a slice taken once (``grp[b * 128:
b * 128 + 128]``), indexed from 0 inside the 32-step loop, so the 4-row loop vectorises
along the 32 codes: per block, 8 ``vpmovsxbd`` (16 codes -> int32 each, zmm here; 16 on
ymm for AVX2 and for LLVM's Intel AVX-512 models, which prefer 256-bit vectors),
8 ``vcvtdq2ps``, 4 ``vmulps`` + 4 ``vfmadd231ps``, then one horizontal sum per row (7 ops)
and a scalar FMA with the scale; no gathers, no ``vpinsrb``. The tail rows (N % 4, the head's
last row) are dequantized once into a float32 row and dotted, a loop LLVM vectorises along
K. The strips' inner loop: 16 ``vfmadd231ps`` per iteration (2 steps of K x 8 sums).

8-bit activations (opt-in: ``set_activations(model, "q8_0")``, ``numgpt quantize
--activations q8_0``, recorded in the checkpoint)
-----------------------------------------------------------------------------------
llama.cpp quantizes the activations to q8_0 blocks too and multiplies codes by codes in
integers. ``matmul_q8_activations`` does the same up to ``STRIPS_MAX_M`` rows: each row is
quantized per 32-block (``d = max|x| / 127`` in float32, ``q = rint(x / d)``), each block's
32 code products summed exactly in int32 (|sum| <= 32 * 127^2 < 2^24), then ``(d_w * d_x) *
sum`` added block after block in float32, with no fastmath, so it equals its NumPy
reference (``matmul_q8_activations_reference``) bit for bit. Above 64 rows it is the float
path (BLAS tiles), as llama.cpp's BLAS backend does. The integer loop compiles to
``vpmovsxbd`` + ``vpmulld`` + ``vpaddd`` (ymm/zmm; ``vpmaddwd`` where LLVM sees one row, in
the tail), not to ``vpmaddwd``/``vpdpbusd`` for 4 rows: LLVM did not form those from any
numba spelling tried (int32 casts, pairs of products), so per 32 weights the integer path
issues about as many instructions as the float one. Measured on this shared AMD EPYC it is
not faster: a 124M decode step at batch 1 took 19.3-20.5 ms with 8-bit activations against
19.3-19.8 ms with float32 ones (per call 0.8x to 1.7x between matrices and runs), and at 16
rows 98-171 ms against the strips' 68-81 (it widens the weights again for every row and sums
every block across the vector). So the default stays float32 activations: exact to
``x @ dequantize(W)^T`` to float32 rounding, the weights the only approximation. Its quality (perplexity, KL, greedy) is in
docs/results/quant_quality.md.

The float kernels are exact for the numbers stored: q * d is exact in float32 (8-bit times
11-bit significands), so the only rounding is float32 accumulation (tests/test_quant.py,
tests/test_quant_kernels.py). There is no float64 path: a q8_0 model computes in float32.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..errors import CheckpointError, ConfigError, DTypeError, ShapeError
from .nn import Linear, Module, Parameter
from .tensor import Tensor

__all__ = ["BLOCK", "SCHEMES", "ACTIVATIONS", "Q8Matrix", "quantize_q8_0", "matmul",
           "matmul_q8_activations", "linear", "embedding", "kernel_for", "kernel_plan",
           "quantize_activations_reference", "matmul_q8_activations_reference", "q8_dot_reference",
           "set_activations",
           "activations_of",
           "QuantizedLinear", "QuantizedEmbedding", "quantize_model", "is_quantized",
           "scheme_of", "quantized_state", "build_quantized", "weight_bytes", "parameter_count",
           "bytes_per_parameter", "stored_shapes",
           "describe", "dequantize_model", "refuse_training"]

BLOCK = 32  # values per q8_0 block (GGML's QK8_0)
SCHEMES = ("q8_0",)
ACTIVATIONS = ("float32", "q8_0")  # what a quantized model multiplies its weights with
# Which kernel runs for M rows of activations (``kernel_for``; measured, see the docstring):
DIRECT_MAX_M = 1  # up to this many rows: the direct kernel (codes widened block by block)
STRIPS_MAX_M = 64  # up to this many: dequantized 4-row strips; above: dequantize + BLAS tiles
ROW_TILE_BYTES = 1 << 18  # rows of x per strip pass: their float32 bytes stay in L2
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

    __slots__ = ("data", "scales", "activations")
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
        self.activations = "float32"  # what ``matmul`` multiplies it with (``set_activations``)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def flat(self) -> np.ndarray:
        """The codes as the kernels read them, (N * K,) int8 (a view of ``data``)."""
        return self.data.reshape(-1)

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


def _build_matmul_direct(parallel: bool = True):
    import numba

    @_njit(parallel=parallel, fastmath=_FASTMATH)
    def q8_matmul_direct(x, data, scale_bits, half, out):
        """out = x @ W^T for W in q8_0 blocks (reference: ``x @ Q8Matrix.dequantize().T``).

        x (M, K) f32; data (N*K,) i8: ``Q8Matrix.data`` flat (groups of 4 rows interleaved
        block by block, then the N % 4 tail rows); scale_bits (N, K/32) u16 (float16 bits,
        widened by ``half``, 65536 f32); out (M, N) f32. prange over the groups of 4 rows: block
        b of a group is 128 contiguous bytes, taken as a slice so the 32-step loop indexes it
        from 0 (LLVM then vectorises that loop: widen 16 codes, convert, FMA, per row), summed
        in float32 and scaled once per block."""
        M, K = x.shape
        N = out.shape[1]
        nb = K // 32
        G = N // 4
        for g in numba.prange(G):
            n = 4 * g
            grp = data[g * 4 * K:(g + 1) * 4 * K]  # the group's 4 rows, (K/32, 4, 32) in order
            for m in range(M):
                xm = x[m]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for b in range(nb):
                    w = grp[b * 128:b * 128 + 128]  # block b of rows n .. n+3
                    xb = xm[b * 32:b * 32 + 32]
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for j in range(32):
                        xv = xb[j]
                        s0 += np.float32(w[j]) * xv
                        s1 += np.float32(w[32 + j]) * xv
                        s2 += np.float32(w[64 + j]) * xv
                        s3 += np.float32(w[96 + j]) * xv
                    a0 += half[scale_bits[n, b]] * s0
                    a1 += half[scale_bits[n + 1, b]] * s1
                    a2 += half[scale_bits[n + 2, b]] * s2
                    a3 += half[scale_bits[n + 3, b]] * s3
                out[m, n] = a0
                out[m, n + 1] = a1
                out[m, n + 2] = a2
                out[m, n + 3] = a3
        if N > 4 * G:  # the last N % 4 rows: each dequantized once (d * q is exact), then dotted
            wr = np.empty(K, np.float32)
            for r in range(4 * G, N):
                row = data[r * K:(r + 1) * K]
                for b in range(nb):
                    d = half[scale_bits[r, b]]
                    for j in range(32):
                        wr[b * 32 + j] = d * np.float32(row[b * 32 + j])
                for m in range(M):
                    xm = x[m]
                    acc = np.float32(0.0)
                    for k in range(K):
                        acc += wr[k] * xm[k]
                    out[m, r] = acc

    return q8_matmul_direct


def _build_matmul_strips(parallel: bool = True):
    import numba

    @_njit(parallel=parallel, fastmath=_FASTMATH)
    def q8_matmul_strips(x, data, scale_bits, half, chunks, row_tile, out):
        """out = x @ W^T for 2 .. ``TILED_MAX_M`` rows of x (the server's batched decode step).

        Arguments as ``q8_matmul_direct``; ``chunks`` independent runs of groups for the
        threads; ``row_tile`` rows of x per pass (even, so x's pass stays in L2). Each thread
        dequantizes one group of 4 weight rows at a time into a (4, K) float32 strip (48 KB at
        K = 3072, in L1/L2): every weight is widened once per pass, not once per row of x; then
        two rows of x against the 4 strip rows keep 8 sums over the whole of K (8 vector
        accumulators, 6 loads per 8 FMAs, one horizontal sum per output, none per block).
        ``d * q`` is exact in float32, so this is the same product as the direct kernel's."""
        M, K = x.shape
        N = out.shape[1]
        nb = K // 32
        G = N // 4
        per = (G + chunks - 1) // chunks
        for c in numba.prange(chunks):
            strip = np.empty((4, K), np.float32)  # one per chunk of groups, reused
            w0 = strip[0]
            w1 = strip[1]
            w2 = strip[2]
            w3 = strip[3]
            for m0 in range(0, M, row_tile):
                m1 = min(M, m0 + row_tile)
                for g in range(c * per, min(G, (c + 1) * per)):
                    n = 4 * g
                    grp = data[g * 4 * K:(g + 1) * 4 * K]
                    for b in range(nb):
                        blk = grp[b * 128:b * 128 + 128]
                        d0 = half[scale_bits[n, b]]
                        d1 = half[scale_bits[n + 1, b]]
                        d2 = half[scale_bits[n + 2, b]]
                        d3 = half[scale_bits[n + 3, b]]
                        o = b * 32
                        for j in range(32):
                            w0[o + j] = d0 * np.float32(blk[j])
                            w1[o + j] = d1 * np.float32(blk[32 + j])
                            w2[o + j] = d2 * np.float32(blk[64 + j])
                            w3[o + j] = d3 * np.float32(blk[96 + j])
                    m = m0
                    while m + 1 < m1:
                        xa = x[m]
                        xb = x[m + 1]
                        a0 = np.float32(0.0)
                        a1 = np.float32(0.0)
                        a2 = np.float32(0.0)
                        a3 = np.float32(0.0)
                        b0 = np.float32(0.0)
                        b1 = np.float32(0.0)
                        b2 = np.float32(0.0)
                        b3 = np.float32(0.0)
                        for k in range(K):
                            u = xa[k]
                            v = xb[k]
                            a0 += w0[k] * u
                            a1 += w1[k] * u
                            a2 += w2[k] * u
                            a3 += w3[k] * u
                            b0 += w0[k] * v
                            b1 += w1[k] * v
                            b2 += w2[k] * v
                            b3 += w3[k] * v
                        out[m, n] = a0
                        out[m, n + 1] = a1
                        out[m, n + 2] = a2
                        out[m, n + 3] = a3
                        out[m + 1, n] = b0
                        out[m + 1, n + 1] = b1
                        out[m + 1, n + 2] = b2
                        out[m + 1, n + 3] = b3
                        m += 2
                    if m < m1:  # an odd row left in this pass
                        xa = x[m]
                        a0 = np.float32(0.0)
                        a1 = np.float32(0.0)
                        a2 = np.float32(0.0)
                        a3 = np.float32(0.0)
                        for k in range(K):
                            u = xa[k]
                            a0 += w0[k] * u
                            a1 += w1[k] * u
                            a2 += w2[k] * u
                            a3 += w3[k] * u
                        out[m, n] = a0
                        out[m, n + 1] = a1
                        out[m, n + 2] = a2
                        out[m, n + 3] = a3
        if N > 4 * G:  # the last N % 4 rows, one at a time through the same strip
            w0 = np.empty(K, np.float32)
            for r in range(4 * G, N):
                row = data[r * K:(r + 1) * K]
                for b in range(nb):
                    d = half[scale_bits[r, b]]
                    for j in range(32):
                        w0[b * 32 + j] = d * np.float32(row[b * 32 + j])
                for m in range(M):
                    xa = x[m]
                    a0 = np.float32(0.0)
                    for k in range(K):
                        a0 += w0[k] * xa[k]
                    out[m, r] = a0

    return q8_matmul_strips


def _build_dequantize_rows():
    import numba

    @_njit(parallel=True)
    def q8_dequantize_rows(data, scale_bits, half, r0, out):
        """Rows r0 .. r0+R of W into ``out`` (R, K) f32 (one BLAS tile; reference:
        ``Q8Matrix.dequantize``). r0 is a multiple of 4; arguments as ``q8_matmul_direct``."""
        R, K = out.shape
        N = scale_bits.shape[0]
        G = N // 4
        nb = K // 32
        g0 = r0 // 4
        g1 = min(G, (r0 + R) // 4)
        for g in numba.prange(g0, g1):  # whole groups: block b of the 4 rows is 128 bytes
            grp = data[g * 4 * K:(g + 1) * 4 * K]
            for r in range(4):
                dst = out[4 * g + r - r0]
                for b in range(nb):
                    d = half[scale_bits[4 * g + r, b]]
                    src = grp[b * 128 + 32 * r:b * 128 + 32 * r + 32]
                    for j in range(32):
                        dst[b * 32 + j] = d * np.float32(src[j])
        for r in range(max(r0, 4 * G), r0 + R):  # tail rows, row by row
            src = data[r * K:(r + 1) * K]
            dst = out[r - r0]
            for b in range(nb):
                d = half[scale_bits[r, b]]
                for j in range(32):
                    dst[b * 32 + j] = d * np.float32(src[b * 32 + j])

    return q8_dequantize_rows


def _build_quantize_activations():
    @_njit()
    def q8_quantize_activations(x, codes, scales):
        """x (M, K) f32 -> codes (M, K) i8 and scales (M, K/32) f32, per block of 32:
        ``d = max|x| / 127`` (float32), ``q = rint(x / d)`` (0 for an all-zero block).
        Reference: ``quantize_activations_reference``; no fastmath, so the two agree bit for bit."""
        M, K = x.shape
        for m in range(M):
            for b in range(K // 32):
                amax = np.float32(0.0)
                for j in range(32 * b, 32 * b + 32):
                    amax = max(amax, abs(x[m, j]))
                d = amax / np.float32(127.0)
                scales[m, b] = d
                for j in range(32 * b, 32 * b + 32):
                    q = np.rint(x[m, j] / d) if d > 0 else np.float32(0.0)
                    codes[m, j] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))

    return q8_quantize_activations


def _build_matmul_q8_activations(parallel: bool = True):
    import numba

    @_njit(parallel=parallel)
    def q8_matmul_q8_activations(xq, xd, data, scale_bits, half, out):
        """out = q8_0(x) @ W^T with integer block dot products (llama.cpp's q8_0 x q8_0).

        xq (M, K) i8 and xd (M, K/32) f32: the activations in q8_0 blocks
        (``q8_quantize_activations``); the weights as in ``q8_matmul_direct``. Each block's 32
        code products are summed exactly in int32 (|sum| <= 32 * 127 * 127), then
        ``out += (d_w * d_x) * float(sum)`` block after block in float32. No fastmath: the
        integer loop vectorises without it, and the float steps happen in exactly the order
        ``matmul_q8_activations_reference`` takes, so the two are equal bit for bit."""
        M, K = xq.shape
        N = out.shape[1]
        nb = K // 32
        G = N // 4
        for g in numba.prange(G):
            n = 4 * g
            grp = data[g * 4 * K:(g + 1) * 4 * K]
            for m in range(M):
                xm = xq[m]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for b in range(nb):
                    w = grp[b * 128:b * 128 + 128]
                    xb = xm[b * 32:b * 32 + 32]
                    s0 = np.int32(0)
                    s1 = np.int32(0)
                    s2 = np.int32(0)
                    s3 = np.int32(0)
                    for j in range(32):
                        xv = np.int32(xb[j])
                        # numba widens int32 products to int64; the casts keep the lanes 32-bit
                        s0 = np.int32(s0 + np.int32(w[j]) * xv)
                        s1 = np.int32(s1 + np.int32(w[32 + j]) * xv)
                        s2 = np.int32(s2 + np.int32(w[64 + j]) * xv)
                        s3 = np.int32(s3 + np.int32(w[96 + j]) * xv)
                    dx = xd[m, b]
                    a0 += (half[scale_bits[n, b]] * dx) * np.float32(s0)
                    a1 += (half[scale_bits[n + 1, b]] * dx) * np.float32(s1)
                    a2 += (half[scale_bits[n + 2, b]] * dx) * np.float32(s2)
                    a3 += (half[scale_bits[n + 3, b]] * dx) * np.float32(s3)
                out[m, n] = a0
                out[m, n + 1] = a1
                out[m, n + 2] = a2
                out[m, n + 3] = a3
        bs = K // nb  # 32, but not as a constant: a constant 32-step loop of one row is
        # unrolled and the block loop vectorised instead, with gathers (the 4-row loop above
        # is too long to unroll); as a variable it is vectorised (vpmaddwd)
        for r in range(4 * G, N):
            row = data[r * K:(r + 1) * K]
            for m in range(M):
                xm = xq[m]
                acc = np.float32(0.0)
                for b in range(nb):
                    w = row[b * 32:b * 32 + 32]
                    xb = xm[b * 32:b * 32 + 32]
                    s = np.int32(0)
                    for j in range(bs):
                        s = np.int32(s + np.int32(w[j]) * np.int32(xb[j]))
                    acc += (half[scale_bits[r, b]] * xd[m, b]) * np.float32(s)
                out[m, r] = acc

    return q8_matmul_q8_activations


_BUILDERS = {"matmul_direct": _build_matmul_direct,
             "matmul_direct_serial": lambda: _build_matmul_direct(parallel=False),
             "matmul_strips": _build_matmul_strips,
             "matmul_strips_serial": lambda: _build_matmul_strips(parallel=False),
             "matmul_q8_activations": _build_matmul_q8_activations,
             "matmul_q8_activations_serial": lambda: _build_matmul_q8_activations(parallel=False),
             "quantize_activations": _build_quantize_activations,
             "dequantize_rows": _build_dequantize_rows}


def _matmul_tiled(x2: np.ndarray, w: Q8Matrix, out: np.ndarray) -> None:
    """out (M, N) = x2 (M, K) @ W^T through float32 tiles of W and BLAS (for large M)."""
    N, K = w.shape
    tile_rows = max(4, TILE_ELEMENTS // K // 4 * 4)  # whole groups of 4 rows per tile
    buf = np.empty((min(tile_rows, N), K), np.float32)  # the one float32 tile, reused
    dequantize_rows = _kernel("dequantize_rows")
    for r0 in range(0, N, tile_rows):
        tile = buf[:min(tile_rows, N - r0)]  # (R, K)
        dequantize_rows(w.flat, w.scales.view(np.uint16), _HALF_TO_FLOAT, r0, tile)
        np.matmul(x2, tile.T, out=out[:, r0:r0 + len(tile)])  # (M, K) @ (K, R) -> (M, R)


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def kernel_for(rows: int, activations: str = "float32") -> str:
    """Which kernel ``matmul`` runs for ``rows`` rows of activations (the one place that decides;
    ``kernel_plan`` prints it)."""
    if rows > STRIPS_MAX_M:
        return "tiles"
    if activations == "q8_0":
        return "q8_activations"
    return "direct" if rows <= DIRECT_MAX_M else "strips"


def kernel_plan() -> str:
    """One line for ``numgpt info`` and the server's start: which q8_0 kernel runs for which
    number of activation rows, and where the crossovers are."""
    return (f"q8_0 matmul: {DIRECT_MAX_M} row direct (codes widened per block); "
            f"{DIRECT_MAX_M + 1}-{STRIPS_MAX_M} rows dequantized 4-row strips, rows in registers; "
            f"above {STRIPS_MAX_M} rows dequantize + BLAS tiles; 8-bit activations (if set) "
            f"up to {STRIPS_MAX_M} rows, integer block dot products")


def matmul(x: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """``x @ W^T``: x (..., K) float32, W (N, K) in q8_0 -> (..., N) float32. With
    ``w.activations == "q8_0"`` x is quantized per block too (``matmul_q8_activations``);
    otherwise the result is ``x @ dequantize(W)^T`` to float32 rounding."""
    if w.activations == "q8_0":
        return matmul_q8_activations(x, w)
    return _matmul_float(x, w)


def _matmul_float(x: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """``x @ W^T`` with float32 activations, by the kernel ``kernel_for`` names."""
    x2, out = _operands(x, w)
    M, (N, K) = x2.shape[0], w.shape
    kind = kernel_for(M)
    serial = "_serial" if M * N * K < SERIAL_MACS else ""  # waking threads would cost more
    bits = w.scales.view(np.uint16)
    if kind == "direct":
        _kernel("matmul_direct" + serial)(x2, w.flat, bits, _HALF_TO_FLOAT, out)
    elif kind == "strips":
        chunks = 1 if serial else min(w.groups or 1, 4 * _threads())  # 4 per thread: balance
        row_tile = max(2, ROW_TILE_BYTES // (4 * K) // 2 * 2)
        _kernel("matmul_strips" + serial)(x2, w.flat, bits, _HALF_TO_FLOAT, chunks, row_tile, out)
    else:
        _matmul_tiled(x2, w, out)
    return out.reshape(*x.shape[:-1], N)


def matmul_q8_activations(x: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """``q8_0(x) @ W^T``: the activations quantized per 32-block as well (llama.cpp's q8_0 x
    q8_0), integer dot products per block; equals ``matmul_q8_activations_reference``
    exactly. Above ``STRIPS_MAX_M`` rows (prefill) it is ``matmul`` (float32 activations
    through BLAS tiles, as llama.cpp's BLAS backend does for large batches)."""
    x2, out = _operands(x, w)
    M, (N, K) = x2.shape[0], w.shape
    if kernel_for(M, "q8_0") != "q8_activations":
        return _matmul_float(x, w)
    xq = np.empty((M, K), np.int8)
    xd = np.empty((M, K // BLOCK), np.float32)
    _kernel("quantize_activations")(x2, xq, xd)
    serial = "_serial" if M * N * K < SERIAL_MACS else ""
    _kernel("matmul_q8_activations" + serial)(xq, xd, w.flat, w.scales.view(np.uint16),
                                              _HALF_TO_FLOAT, out)
    return out.reshape(*x.shape[:-1], N)


def _operands(x: np.ndarray, w: Q8Matrix) -> tuple[np.ndarray, np.ndarray]:
    """x as a contiguous (M, K) float32 matrix and an empty (M, N) float32 output."""
    N, K = w.shape
    if x.shape[-1] != K:
        raise ShapeError(f"quantized matmul: input {x.shape} does not match weight (out, in) {w.shape}")
    if x.dtype != np.float32:
        raise ShapeError(f"quantized matmul takes float32 activations, got {x.dtype}")
    x2 = np.ascontiguousarray(x.reshape(-1, K))  # (M, K)
    return x2, np.empty((x2.shape[0], N), np.float32)  # (M, N)


# ------------------------------------------------- the 8-bit activations' NumPy reference

def quantize_activations_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 -> codes (M, K) int8 and scales (M, K/32) float32, per block of 32:
    ``d = max|x| / 127`` and ``q = rint(x / d)``, in float32 (0 codes for a zero block)."""
    M, K = x.shape
    xb = x.reshape(M, K // BLOCK, BLOCK)  # (M, K/32, 32)
    d = np.abs(xb).max(axis=-1) / np.float32(127.0)  # (M, K/32) float32
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(xb / d[..., None]), np.float32(0.0))
    return np.clip(q, -127, 127).astype(np.int8).reshape(M, K), d


def matmul_q8_activations_reference(x: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """What ``matmul_q8_activations`` computes, in NumPy: exact integer block sums (int64),
    times ``float32(d_w * d_x)``, added block after block in float32. (M, K) -> (M, N)."""
    return q8_dot_reference(*quantize_activations_reference(x), w)


def q8_dot_reference(xq: np.ndarray, xd: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """The integer half of ``matmul_q8_activations_reference``: activation codes (M, K) int8
    and scales (M, K/32) float32 times W's blocks -> (M, N) float32."""
    M, (N, K) = xq.shape[0], w.shape
    nb = K // BLOCK
    sums = np.einsum("mbj,nbj->mnb", xq.reshape(M, nb, BLOCK).astype(np.int64),
                     w.qs.reshape(N, nb, BLOCK).astype(np.int64))  # (M, N, K/32), exact
    dd = w.scales.astype(np.float32)[None, :, :] * xd[:, None, :]  # (M, N, K/32) float32
    terms = dd * sums.astype(np.float32)  # exact: |sum| < 2^24
    out = np.zeros((M, N), np.float32)
    for b in range(nb):
        out += terms[:, :, b]
    return out


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


def _matrices(model) -> list[Q8Matrix]:
    """Every q8_0 matrix of a quantized model: the block Linears' weights and the tied wte."""
    return [getattr(o, a).weight for o, a, _ in _linear_slots(model)] + [model.wte.weight]


def activations_of(model) -> str | None:
    """``"float32"`` or ``"q8_0"``: what a quantized model multiplies its weights with."""
    return model.wte.weight.activations if is_quantized(model) else None


def set_activations(model, activations: str):
    """Make every quantized matmul of ``model`` take ``activations``: ``"float32"`` (the
    default; the result is ``x @ dequantize(W)^T`` to float32 rounding) or ``"q8_0"`` (x is
    quantized per 32-block as well and each block is an integer dot product, as llama.cpp
    computes q8_0; an approximation with its own gates in tests/test_quant_kernels.py).
    Returns the model. ``numgpt quantize --activations`` records it in the checkpoint."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations {activations!r} is not one of {list(ACTIVATIONS)}")
    if not is_quantized(model):
        raise ConfigError(f"activations={activations!r} applies to a quantized model; this one "
                          f"is float (run numgpt quantize first)")
    for w in _matrices(model):
        w.activations = activations
    return model


def quantize_model(model, scheme: str = "q8_0", activations: str = "float32"):
    """Replace every matrix weight of ``model`` (in place) by q8_0 blocks; returns it.

    LayerNorms, biases and ``wpe`` stay float32 (a float64 model's are cast: a quantized
    model computes in float32). The float matrices are dropped, so their memory is freed.
    ``activations`` is what the matrices are multiplied with (``set_activations``).
    """
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations {activations!r} is not one of {list(ACTIVATIONS)}")
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
    return set_activations(model, activations)


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


def build_quantized(model, read: Mapping[str, Callable[[], np.ndarray]], where: str,
                    activations: str = "float32"):
    """Fill a fresh ``GPT(config, seed=None)`` from a quantized state (see ``quantized_state``);
    its matrices take ``activations`` (what the checkpoint recorded, ``describe``).

    The model's float matrices are replaced before anything is written into them, so
    their pages (``np.zeros``: untouched, never resident) do not add to peak memory.
    ``read`` maps each stored name to a function returning its array; keys and shapes are
    checked, naming ``where`` in the error.
    """
    if activations not in ACTIVATIONS:
        raise CheckpointError(f"{where}: recorded activations {activations!r} are not one of "
                              f"{list(ACTIVATIONS)}; upgrade numgpt or re-quantize")
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
    return set_activations(model, activations)


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
            "quantized_bytes": sizes["quantized"], "float_bytes": sizes["float"],
            "activations": activations_of(model)}


def refuse_training(model, what: str = "training") -> None:
    """ConfigError if ``model`` is quantized: its weights are inference-only."""
    if is_quantized(model):
        raise ConfigError(f"this model's weights are quantized ({scheme_of(model)}), which is "
                          f"inference-only; {what} needs float weights: use the float32 "
                          f"checkpoint it was quantized from")
