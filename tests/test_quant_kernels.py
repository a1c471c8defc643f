"""The q8_0 kernels (numgpt/core/quant.py): every kernel against its reference, the 8-bit
activations bit for bit against their NumPy integer reference, the generated machine code
(vector instructions on this CPU, and on AVX2 and AVX-512 targets compiled in a subprocess),
which kernel runs for which row count, and the ``--activations`` setting end to end.

Each check has a negative control that fails it: a kernel with the wrong block's scale, an
activation scale off by one code step, a deliberately scalar toy kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numgpt.core import quant
from numgpt.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
U32 = 2.0 ** -24  # float32 unit roundoff


def _q(N: int, K: int, seed: int = 0, scale: float = 0.02) -> quant.Q8Matrix:
    return quant.quantize_q8_0(np.random.default_rng(seed).normal(0, scale, (N, K)).astype(np.float32))


def _ratio(x: np.ndarray, w: quant.Q8Matrix, got: np.ndarray) -> float:
    """Largest |got - exact| / bound over the outputs, bound = (K + 2) u sum_k |x_k W_nk|
    (float32 summation in any order; +2: the product and the block scale)."""
    K = w.shape[1]
    wd = w.dequantize()
    exact = x.astype(np.float64) @ wd.T
    bound = (K + 2) * U32 * (np.abs(x.astype(np.float64)) @ np.abs(wd).T)
    return float(np.max(np.abs(got - exact) / (bound + 1e-300)))


def _run(kind: str, x: np.ndarray, w: quant.Q8Matrix, serial: bool) -> np.ndarray:
    """One float32 kernel called directly (both builds), as ``matmul`` calls it."""
    M, (N, K) = x.shape[0], w.shape
    out = np.empty((M, N), np.float32)
    bits, suffix = w.scales.view(np.uint16), "_serial" if serial else ""
    if kind == "direct":
        quant._kernel("matmul_direct" + suffix)(x, w.flat, bits, quant._HALF_TO_FLOAT, out)
    elif kind == "strips":
        quant._kernel("matmul_strips" + suffix)(x, w.flat, bits, quant._HALF_TO_FLOAT, 3, 4, out)
    else:
        quant._matmul_tiled(x, w, out)
    return out


# ------------------------------------------------------------ float32 activations

@pytest.mark.parametrize("kind,serial", [("direct", False), ("direct", True), ("strips", False),
                                         ("strips", True), ("tiles", False)])  # tiles: one build
@pytest.mark.parametrize("N,K", [(64, 96), (67, 96), (1030, 1024), (13, 32)])  # tails of 0, 3, 2, 1 rows
@pytest.mark.parametrize("M", [1, 2, 5, 9])  # odd counts: the strips' single-row pass; 9 > row_tile 4
def test_each_float_kernel_equals_the_float64_product_to_float32_rounding(kind, serial, N, K, M, monkeypatch):
    monkeypatch.setattr(quant, "TILE_ELEMENTS", 40 * K)  # several tiles and a partial one
    w = _q(N, K, seed=N + K)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    assert _ratio(x, w, _run(kind, x, w, serial)) <= 1.0


def test_the_float_kernel_check_fails_a_strip_with_the_wrong_blocks_scale():
    """Negative control: the same check on a product whose block scales are shifted by one."""
    w = _q(64, 128, seed=1)
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    shifted = quant.Q8Matrix(w.qs, np.roll(w.scales, 1, axis=1))
    assert _ratio(x, w, _run("strips", x, shifted, serial=True)) > 1.0


@pytest.mark.parametrize("M", [1, 2, 16, 64, 65])
def test_matmul_runs_the_kernel_kernel_for_names(M, monkeypatch):
    """The dispatch follows the one table (kernel_for): each kernel is seen being called."""
    seen = []
    real = quant._kernel

    def spy(name):
        seen.append(name)
        return real(name)
    monkeypatch.setattr(quant, "_kernel", spy)
    w = _q(256, 64)
    quant.matmul(np.ones((M, 64), np.float32), w)
    want = {"direct": "matmul_direct", "strips": "matmul_strips", "tiles": "dequantize_rows"}[quant.kernel_for(M)]
    assert seen and all(s.startswith(want) for s in seen), (M, seen)
    assert quant.kernel_for(1) == "direct" and quant.kernel_for(quant.STRIPS_MAX_M) == "strips"
    assert quant.kernel_for(quant.STRIPS_MAX_M + 1) == "tiles"
    assert quant.kernel_for(16, "q8_0") == "q8_activations"
    plan = quant.kernel_plan()
    assert f"{quant.STRIPS_MAX_M} rows" in plan and "BLAS" in plan


# ------------------------------------------------------------------ 8-bit activations

def _activations(M: int, K: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    if M > 1:
        x[1, 32:64] *= 1e4  # a large block beside small ones
        x[1, 64 % K:64 % K + 32] *= 1e-30  # a block of float32 subnormal-sized values
    return x


@pytest.mark.parametrize("M,N,K", [(1, 64, 96), (3, 67, 96), (16, 1030, 1024), (64, 13, 64)])
@pytest.mark.parametrize("serial", [False, True])
def test_8_bit_activation_kernel_equals_its_integer_reference_bit_for_bit(M, N, K, serial, monkeypatch):
    if serial:
        monkeypatch.setattr(quant, "SERIAL_MACS", 1 << 62)
    else:
        monkeypatch.setattr(quant, "SERIAL_MACS", 0)
    w = _q(N, K, seed=K)
    x = _activations(M, K, seed=M)
    codes, scales = quant.quantize_activations_reference(x)
    kq, kd = np.empty_like(codes), np.empty_like(scales)
    quant._kernel("quantize_activations")(x, kq, kd)
    assert np.array_equal(kq, codes) and np.array_equal(kd, scales)
    assert np.abs(codes.astype(int)).max() <= 127 and not codes[0, :32].any() and scales[0, 0] == 0
    got = quant.matmul_q8_activations(x, w)
    assert np.array_equal(got, quant.matmul_q8_activations_reference(x, w))


def test_the_exact_check_fails_an_activation_scale_off_by_one_step():
    """Negative control: codes made with max|x| / 128 instead of / 127 (a kernel that
    quantizes the activations with the wrong scale) do not give the reference's bits."""
    w = _q(64, 96)
    x = _activations(2, 96, seed=3)
    xb = x.reshape(2, 3, 32)
    d = np.abs(xb).max(-1) / np.float32(128.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(xb / d[..., None]), 0).astype(np.int8).reshape(2, 96)
    sums = np.einsum("mbj,nbj->mnb", q.reshape(2, 3, 32).astype(np.int64),
                     w.qs.reshape(64, 3, 32).astype(np.int64)).astype(np.float32)
    broken = (w.scales.astype(np.float32)[None] * d[:, None] * sums).sum(-1)
    assert not np.array_equal(broken, quant.matmul_q8_activations_reference(x, w))


def test_8_bit_activations_stay_within_their_error_model_of_the_float_product():
    """Each activation is off by at most half its block's step d_x / 2, so each output is off
    from x @ W^T (dequantized W) by at most sum_b d_x,b / 2 * sum_j |W_nj| plus float32
    rounding; the measured error is also far from zero (the approximation is real)."""
    w = _q(300, 768, seed=4)
    x = np.random.default_rng(5).standard_normal((4, 768)).astype(np.float32)
    got = quant.matmul_q8_activations(x, w).astype(np.float64)
    wd = w.dequantize()
    exact = x.astype(np.float64) @ wd.T
    _, d = quant.quantize_activations_reference(x)
    step = np.repeat(d.astype(np.float64), 32, axis=1) / 2  # (M, K): the largest error of each x
    bound = step @ np.abs(wd).T + (768 + 2) * U32 * (np.abs(x) @ np.abs(wd).T)
    assert np.all(np.abs(got - exact) <= bound)
    assert np.max(np.abs(got - exact)) > 1e-4 * np.max(np.abs(exact))


def test_above_the_strips_rows_8_bit_activations_fall_back_to_the_float_product():
    w = _q(64, 96)
    x = np.random.default_rng(6).standard_normal((quant.STRIPS_MAX_M + 1, 96)).astype(np.float32)
    assert _ratio(x, w, quant.matmul_q8_activations(x, w)) <= 1.0


# -------------------------------------------------------------- the generated code

_ASM_CHILD = r"""
import json, sys
from collections import Counter
import numba
from numba import types as t
from numgpt.core import quant
F, I8, U16 = t.float32, t.int8, t.uint16
sigs = {"direct": (F[:, ::1], I8[::1], U16[:, ::1], F[::1], F[:, ::1]),
        "strips": (F[:, ::1], I8[::1], U16[:, ::1], F[::1], t.int64, t.int64, F[:, ::1]),
        "q8_activations": (I8[:, ::1], F[:, ::1], I8[::1], U16[:, ::1], F[::1], F[:, ::1])}
builders = {"direct": quant._build_matmul_direct, "strips": quant._build_matmul_strips,
            "q8_activations": quant._build_matmul_q8_activations}
out = {}
for name, build in builders.items():
    f = build(parallel=False)  # the serial build: the same loop body, in one function
    f.compile(sigs[name])  # (the threaded build's body is a separate gufunc)
    asm = next(iter(f.inspect_asm().values()))
    out[name] = asm
print(json.dumps(out))
"""

# target CPU -> (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, vector register LLVM uses there)
_AVX2 = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,"
         "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512bw,-avx512vl,-avx512dq,-avx512cd,-avx512vnni")
_AVX512 = "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd,+avx512vnni"
TARGETS = {"haswell (AVX2)": ("haswell", _AVX2), "znver3 (AVX2)": ("znver3", _AVX2),
           "skylake-avx512": ("skylake-avx512", _AVX512), "icelake-server": ("icelake-server", _AVX512)}


def _assembly(cpu: tuple[str, str] | None, cache: Path) -> dict[str, str]:
    """The three kernels' assembly, compiled in a fresh process for ``cpu`` (None: this one),
    with numba's cache in ``cache`` (a test's own folder: the user's cache stays as it was)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(cache)}
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    if cpu is not None:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = cpu
    done = subprocess.run([sys.executable, "-c", _ASM_CHILD], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def vector_code(asm: str, kind: str) -> list[str]:
    """What is wrong with a kernel's machine code ([] when nothing): its hot loop must widen
    int8 codes in vector registers (vpmovsx* on xmm/ymm/zmm) and multiply-add in vector
    registers (float kernels: vfmadd*ps or vmulps+vaddps on ymm/zmm; integer: vpmulld or
    vpmaddwd/vpdp* on ymm/zmm), with no gathers and no byte-by-byte vector building (vpinsrb):
    what LLVM emits when it vectorises the wrong loop."""
    lines = [ln.strip() for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".", "#"))]
    wide = [ln for ln in lines if "ymm" in ln or "zmm" in ln]
    problems = []
    if not any(ln.startswith("vpmovsx") for ln in wide):
        problems.append("no vector int8 widening (vpmovsx* on ymm/zmm)")
    if kind == "q8_activations":
        fma = ("vpmulld", "vpmaddwd", "vpdpbusd", "vpdpwssd")
        mads = [ln for ln in wide if ln.startswith(fma)]
    else:
        fma = ("vfmadd",)
        mads = [ln for ln in wide if ln.startswith(fma) and ln.split()[0].endswith("ps")]
    if not mads:
        problems.append(f"no vector multiply-add ({'/'.join(fma)} on ymm/zmm)")
    for bad in ("vgather", "vpgather", "vpinsrb"):
        n = sum(ln.startswith(bad) for ln in lines)
        if n:
            problems.append(f"{n} x {bad}")
    return problems


@pytest.fixture(scope="module")
def host_assembly(tmp_path_factory):
    return _assembly(None, tmp_path_factory.mktemp("numba"))


@pytest.mark.parametrize("kind", ["direct", "strips", "q8_activations"])
def test_each_kernel_is_vector_code_on_this_cpu(host_assembly, kind):
    assert vector_code(host_assembly[kind], kind) == []


@pytest.mark.parametrize("target", list(TARGETS))
def test_each_kernel_is_vector_code_on_avx2_and_avx512_targets(target, tmp_path):
    """Compiled for the other vendors' instruction sets (LLVM's own CPU models): the same
    vector inner loops, in ymm registers (LLVM prefers 256-bit vectors on these Intel
    targets, and AVX2 has no other)."""
    asm = _assembly(TARGETS[target], tmp_path)
    for kind, code in asm.items():
        assert vector_code(code, kind) == [], (target, kind)
        assert "zmm" not in code or target in ("skylake-avx512", "icelake-server"), (target, kind)


_SCALAR_TOY = r"""
import json, numba, numpy as np
from numba import types as t

@numba.njit(fastmath=False)
def toy(x, codes, out):  # data-dependent indices and a strict float sum: no vector loop
    for n in range(out.shape[0]):
        acc = np.float32(0.0)
        for k in range(x.shape[0]):
            acc += np.float32(codes[(n * 7919 + k * 31) % codes.shape[0]]) * x[k]
        out[n] = acc
toy.compile((t.float32[::1], t.int8[::1], t.float32[::1]))
print(json.dumps(next(iter(toy.inspect_asm().values()))))
"""


def test_the_vector_code_check_fails_a_scalar_toy_kernel():
    """Negative control: a loop LLVM cannot vectorise (a strict float sum over codes read at
    scattered places) compiled the same way fails the check."""
    done = subprocess.run([sys.executable, "-c", _SCALAR_TOY], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    asm = json.loads(done.stdout.strip().splitlines()[-1])
    problems = vector_code(asm, "direct")
    assert "no vector int8 widening (vpmovsx* on ymm/zmm)" in problems, problems
    assert any(p.startswith("no vector multiply-add") for p in problems), problems


# ------------------------------------------------------------- the activations setting

def _small():
    from numgpt.core.model import GPT, GPTConfig
    from numgpt.io.tokenizer import ByteTokenizer

    m = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64), seed=3)
    m.tokenizer = ByteTokenizer()
    return m


def test_set_activations_switches_every_matrix_and_refuses_what_it_cannot_do():
    q = quant.quantize_model(_small())
    assert quant.activations_of(q) == "float32"
    quant.set_activations(q, "q8_0")
    assert {w.activations for w in quant._matrices(q)} == {"q8_0"}
    assert quant.describe(q)["activations"] == "q8_0"
    with pytest.raises(ConfigError, match="'int4' is not one of"):
        quant.set_activations(q, "int4")
    with pytest.raises(ConfigError, match="float"):
        quant.set_activations(_small(), "q8_0")


def test_a_model_with_8_bit_activations_computes_through_the_integer_kernel():
    from numgpt.core.tensor import no_grad

    q = quant.quantize_model(_small())
    ids = np.array([[1, 2, 3, 4, 200]])
    with no_grad():
        f32 = q(ids)[0].data
        quant.set_activations(q, "q8_0")
        q8 = q(ids)[0].data
    assert not np.array_equal(f32, q8)  # the activations really were quantized
    assert np.max(np.abs(q8 - f32)) < 0.05 * np.max(np.abs(f32))


def test_the_activations_setting_round_trips_through_a_checkpoint_and_the_cli(tmp_path, capsys):
    import numgpt
    from numgpt import cli
    from numgpt.io import checkpoint

    checkpoint.save(_small(), tmp_path / "f32")
    assert cli.main(["quantize", str(tmp_path / "f32"), str(tmp_path / "q8a"), "--activations", "q8_0"]) == 0
    assert json.loads((tmp_path / "q8a.json").read_text())["quantization"]["activations"] == "q8_0"
    assert quant.activations_of(numgpt.load(tmp_path / "q8a")) == "q8_0"
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "q8a")]) == 0
    out = capsys.readouterr().out
    assert "activations q8_0" in out and quant.kernel_plan() in out
    # a q8_0 checkpoint: --activations re-records only the setting (the blocks are unchanged)
    assert cli.main(["quantize", str(tmp_path / "q8a"), str(tmp_path / "back"), "--activations", "float32"]) == 0
    back = numgpt.load(tmp_path / "back")
    assert quant.activations_of(back) == "float32"
    assert np.array_equal(back.h[0].mlp.c_fc.weight.qs, numgpt.load(tmp_path / "q8a").h[0].mlp.c_fc.weight.qs)
    # without --activations a q8_0 model is still refused, as before
    assert cli.main(["quantize", str(tmp_path / "q8a"), str(tmp_path / "x")]) != 0
    # a checkpoint that records what this numgpt cannot do is a one-line CheckpointError
    doc = json.loads((tmp_path / "q8a.json").read_text())
    doc["quantization"]["activations"] = "q4"
    (tmp_path / "q8a.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="activations 'q4'"):
        numgpt.load(tmp_path / "q8a")
