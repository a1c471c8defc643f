"""The GEMM library choice (numgpt/core/gemm.py): ``mm`` equals NumPy's product on every
library, transposition, layout and dtype; the choice is explicit, resolved as documented, and
printed; a library that is not installed is a one-line ConfigError naming the fix.

The gates (gradient check, layer/model/curve parity, greedy generation) rerun with each
library in tests/test_gemm_gates.py.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numgpt import cli
from numgpt.core import gemm, kernels, ops
from numgpt.errors import ConfigError

LIBS = gemm.available()
NEEDS_MKL = pytest.mark.skipif("mkl" not in LIBS, reason="oneMKL is not installed "
                                                         "(pip install 'numgpt[mkl]')")


@pytest.fixture(params=list(gemm.LIBRARIES))
def library(request):
    """Each library in turn (mkl skipped where absent); the previous choice restored after."""
    if request.param not in LIBS:
        pytest.skip("oneMKL is not installed (pip install 'numgpt[mkl]')")
    before = gemm.current()
    gemm.select(request.param)
    yield request.param
    gemm.select(before)


def _bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rounding bound of a dot product of length k: k * eps * (|a| @ |b|), elementwise."""
    eps = np.finfo(a.dtype).eps
    return a.shape[1] * eps * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))


def _exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) @ b.astype(np.float64)


def _within_bound(got: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    return got.shape == (a.shape[0], b.shape[1]) and \
        bool(np.all(np.abs(got - _exact(a, b)) <= _bound(a, b)))


def _views(x: np.ndarray) -> dict[str, np.ndarray]:
    """``x`` (r, c) as: C-contiguous; the transpose of a C-contiguous (c, r) array (read as
    CblasTrans); rows spaced wider than c (a column slice); a non-unit inner stride (copied)."""
    wide = np.zeros((x.shape[0], x.shape[1] + 5), x.dtype)
    wide[:, 2:2 + x.shape[1]] = x
    spaced = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
    spaced[:, ::2] = x
    return {"C": x.copy(), "T": np.ascontiguousarray(x.T).T, "row-strided": wide[:, 2:2 + x.shape[1]],
            "elem-strided": spaced[:, ::2]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (1, 64, 129), (33, 1, 8), (16, 768, 96), (4, 9, 1)])
def test_mm_equals_the_exact_product_for_every_layout_and_dtype(library, dtype, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    for na, va in _views(a).items():
        for nb, vb in _views(b).items():
            got = gemm.mm(va, vb)
            assert got.dtype == dtype and got.flags.c_contiguous
            assert _within_bound(got, a, b), f"{library} {dtype.__name__} {na} @ {nb}"
            if dtype == np.float64:  # the gates' float64 tolerance
                ref = _exact(a, b)
                assert np.max(np.abs(got - ref)) <= 1e-12 * max(1.0, np.max(np.abs(ref)))


def test_mm_writes_into_out_and_survives_an_out_that_overlaps_an_input(library):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6)).astype(np.float32)
    b = rng.standard_normal((6, 6)).astype(np.float32)
    out = np.empty((6, 6), np.float32)
    assert gemm.mm(a, b, out) is out and _within_bound(out, a, b)
    a0 = a.copy()
    got = gemm.mm(a, b, out=a)  # out is a: the product must read a before writing it
    assert got is a and _within_bound(got, a0, b)


def test_mm_hands_other_dtypes_and_empty_operands_to_numpy(library):
    a16, b16 = np.ones((3, 4), np.float16), np.ones((4, 2), np.float16)
    assert gemm.mm(a16, b16).dtype == np.float16 and np.all(gemm.mm(a16, b16) == 4)
    assert gemm.mm(np.ones((0, 4), np.float32), np.ones((4, 2), np.float32)).shape == (0, 2)
    assert np.all(gemm.mm(np.ones((2, 0), np.float32), np.ones((0, 3), np.float32)) == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_openblas_runs_two_or_three_rows_as_one_gemv_per_row(dtype, monkeypatch):
    """gemm.ROW_BY_ROW: on OpenBLAS a product of 2 or 3 rows is one GEMV per row, so each row
    of a C-contiguous input is bit for bit its one-row product (the batch-1 decode's), and within the rounding bound
    (float64: 1e-12) for every layout; 1 and 4 rows stay one NumPy product (counted)."""
    before = gemm.current()
    gemm.select("openblas")
    try:
        rng = np.random.default_rng(4)
        k, n = 768, 130
        b = rng.standard_normal((k, n)).astype(dtype)
        real, split = gemm._row_by_row, []
        monkeypatch.setattr(gemm, "_row_by_row", lambda x, y: split.append(1) or real(x, y))
        for m in range(1, 6):
            a = rng.standard_normal((m, k)).astype(dtype)
            split.clear()
            for name, va in _views(a).items():
                got = gemm.mm(va, b)
                assert _within_bound(got, a, b), f"{m} rows, {name}"
                if dtype == np.float64:
                    ref = _exact(a, b)
                    assert np.max(np.abs(got - ref)) <= 1e-12 * max(1.0, np.max(np.abs(ref)))
                if name == "C" and gemm.ROW_BY_ROW[0] <= m <= gemm.ROW_BY_ROW[1]:  # decode's layout
                    assert all(np.array_equal(got[i], gemm.mm(a[i:i + 1], b)[0]) for i in range(m))
            assert len(split) == (4 if gemm.ROW_BY_ROW[0] <= m <= gemm.ROW_BY_ROW[1] else 0), m
    finally:
        gemm.select(before)


def test_negative_control_a_row_split_that_repeats_a_row_fails_the_check():
    """The row check is not blind: a split that multiplies row 0 twice (an off-by-one in the
    loop) gives a product outside the bound, and the correct split passes it."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 64)).astype(np.float32)
    b = rng.standard_normal((64, 9)).astype(np.float32)
    wrong = np.stack([np.matmul(a[max(i - 1, 0)], b) for i in range(3)])
    assert not _within_bound(wrong, a, b)
    assert _within_bound(gemm._row_by_row(a, b), a, b)


@NEEDS_MKL
def test_negative_control_a_wrong_leading_dimension_fails_the_check():
    """The check above is not blind: sgemm called with ldb = n - 1 (one element short per
    row, the mistake a wrong stride would make) gives a product outside the bound."""
    before = gemm.current()
    gemm.select("mkl")
    try:
        rng = np.random.default_rng(2)
        m, k, n = 4, 8, 6
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        out = np.zeros((m, n), np.float32)
        gemm._mkl.cblas_sgemm(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n - 1,
                              0.0, out.ctypes.data, n)
        assert not _within_bound(out, a, b)
        gemm._mkl.cblas_sgemm(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n,
                              0.0, out.ctypes.data, n)
        assert _within_bound(out, a, b)  # the same call with ldb = n passes
    finally:
        gemm.select(before)


def test_linear_and_tied_head_run_on_the_selected_library(library, monkeypatch):
    """ops.linear (forward and both backward products), ops.tied_head and the fast tied head
    all call gemm.mm, and equal the float64 product within float32 rounding."""
    calls = []
    real = gemm.mm
    monkeypatch.setattr(gemm, "mm", lambda a, b, out=None: calls.append(gemm.current()) or real(a, b, out))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    out, back = ops.linear(x, w)
    assert _within_bound(out.reshape(6, 8), x.reshape(6, 16), w)
    dx, dw, _ = back(np.ones_like(out))
    assert _within_bound(dw, x.reshape(6, 16).T, np.ones((6, 8), np.float32))
    assert len(calls) == 3
    we = rng.standard_normal((50, 16)).astype(np.float32)
    for head in (ops.tied_head, kernels.tied_head):
        calls.clear()
        logits, back = head(x, we)
        assert _within_bound(logits.reshape(6, 50), x.reshape(6, 16), we.T)
        back(np.ones_like(logits))
        assert calls == [library] * 3


def test_an_unknown_library_is_a_one_line_config_error(monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"'blis'.*choose one of auto, openblas, mkl"):
        gemm.select("blis")
    monkeypatch.setenv(gemm.ENV, "nope")
    with pytest.raises(ConfigError, match=r"'nope' \(from NUMGPT_GEMM"):
        gemm.resolve(None)
    assert cli.main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2  # before loading
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "auto, openblas, mkl" in err[0], err


def test_mkl_missing_is_a_config_error_naming_the_fix(monkeypatch, tmp_path):
    """MKL_RT pointing at a file that is not the library: select('mkl') says how to install it,
    and nothing changes (openblas keeps running)."""
    before = gemm.current()
    bad = tmp_path / "libmkl_rt.so"
    bad.write_text("not a library")
    monkeypatch.setenv(gemm.MKL_ENV, str(bad))
    monkeypatch.setattr(gemm, "_mkl", None)
    with pytest.raises(ConfigError) as err:
        gemm.select("mkl")
    msg = str(err.value)
    assert "\n" not in msg and "pip install 'numgpt[mkl]'" in msg and str(bad) in msg
    assert gemm.current() == before and gemm.available() == ["openblas"]


def test_cli_refuses_a_missing_mkl_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(gemm.MKL_ENV, str(tmp_path / "absent.so"))
    monkeypatch.setattr(gemm, "_mkl_candidates", lambda: [])
    monkeypatch.delenv(gemm.ENV, raising=False)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", "--gemm", "mkl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'numgpt[mkl]'" in err[0], err
    monkeypatch.delenv(gemm.ENV, raising=False)  # the CLI set it for its process


def test_auto_takes_the_recorded_measurement_else_the_vendor_rule(monkeypatch, tmp_path):
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "record_path", lambda: tmp_path / "gemm.json")
    monkeypatch.setattr(gemm, "_mkl_candidates", lambda: ["/some/libmkl_rt.so"])
    monkeypatch.setattr(gemm, "cpu_model", lambda: "Test CPU 9000")
    for vendor, lib in (("GenuineIntel", "mkl"), ("AuthenticAMD", "openblas")):
        monkeypatch.setattr(gemm, "cpu_vendor", lambda v=vendor: v)
        got, why = gemm.resolve()
        assert got == lib and vendor in why and "no measurement recorded" in why
    monkeypatch.setattr(gemm, "_mkl_candidates", lambda: [])  # Intel without the wheel
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")
    got, why = gemm.resolve()
    assert got == "openblas" and "MKL not installed" in why
    # a recorded measurement wins over the vendor rule, for this CPU model only
    monkeypatch.setattr(gemm, "_mkl_candidates", lambda: ["/some/libmkl_rt.so"])
    (tmp_path / "gemm.json").write_text(json.dumps(
        {"Test CPU 9000": {"choice": "openblas", "summary": "measured"},
         "Other CPU": {"choice": "mkl", "summary": "measured"}}))
    assert gemm.resolve() == ("openblas", "auto: measured on this Test CPU 9000 by `numgpt compile` (measured)")
    monkeypatch.setattr(gemm, "cpu_model", lambda: "Unmeasured CPU")
    assert "no measurement recorded" in gemm.resolve()[1]
    # explicit choices win over auto
    monkeypatch.setenv(gemm.ENV, "openblas")
    assert gemm.resolve() == ("openblas", "asked for by NUMGPT_GEMM (or --gemm)")
    assert gemm.resolve("mkl", "--gemm") == ("mkl", "asked for by --gemm")


def test_record_chooses_mkl_only_when_it_measures_5_percent_faster(monkeypatch, tmp_path):
    monkeypatch.setattr(gemm, "record_path", lambda: tmp_path / "gemm.json")
    (tmp_path / "gemm.json").write_text(json.dumps({"Other CPU": {"choice": "mkl"}}))

    def results(ratio):
        return {"openblas": {g: [100.0] * len(s) for g, s in gemm.SHAPES.items()},
                "mkl": {g: [100.0 * ratio] * len(s) for g, s in gemm.SHAPES.items()}}
    record, choice, summary = gemm.record_measurement(results(1.06))
    assert choice == "mkl" and "1.06x" in summary
    assert record["Other CPU"] == {"choice": "mkl"} and record[gemm.cpu_model()]["choice"] == "mkl"
    assert gemm.record_measurement(results(1.04))[1] == "openblas"
    assert gemm.record_measurement({"openblas": results(1)["openblas"]})[1:] == \
        ("openblas", "mkl not installed")


@NEEDS_MKL
def test_selecting_mkl_moves_the_threads_and_selecting_openblas_gives_them_back():
    from threadpoolctl import threadpool_info

    def openblas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openblas"]
    before = gemm.current()
    gemm.select("openblas")
    n = openblas_threads()
    gemm.select("mkl")
    assert openblas_threads() == [1] * len(n) and gemm._mkl.MKL_Get_Max_Threads() == max(n)
    gemm.select("openblas")
    assert openblas_threads() == n
    gemm.select(before)


def test_describe_names_library_version_threads_reason_and_decode_rows(library):
    line = gemm.describe()
    assert "\n" not in line and line.startswith(library)
    assert ("oneMKL" if library == "mkl" else "OpenBLAS") in line and "threads" in line
    assert "decode rows: 1 row -> " in line and "; 2-3 rows -> openblas: one GEMV per row" in line \
        and "4-64 rows -> " in line and "asked for by" in line


def test_every_computing_command_names_the_library_on_stderr(monkeypatch, capsys):
    monkeypatch.delenv(gemm.ENV, raising=False)
    parser = cli.build_parser()
    for command in sorted(cli._GEMM_COMMANDS):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert any("--gemm" in a.option_strings for a in sub._actions), command
        cli._note_gemm(argparse.Namespace(command=command, gemm="openblas"))
        rows = f"; decode rows: {gemm.decode_rows_text()}" if command == "serve" else ""
        assert capsys.readouterr().err == f"numgpt: GEMM library openblas: asked for by --gemm{rows}\n"
    monkeypatch.delenv(gemm.ENV, raising=False)
    cli._note_gemm(argparse.Namespace(command="generate", gemm=None))
    lib, why = gemm.resolve()
    assert capsys.readouterr().err == f"numgpt: GEMM library {lib}: {why}\n"


def test_info_prints_the_gemm_line(tmp_path, capsys, monkeypatch):
    from numgpt.core.config import GPTConfig
    from numgpt.core.model import GPT
    from numgpt.io import checkpoint

    monkeypatch.delenv(gemm.ENV, raising=False)
    prefix = tmp_path / "m"
    checkpoint.save(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8)), prefix)
    assert cli.main(["info", str(prefix), "--gemm", "openblas"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gemm ")]
    assert len(lines) == 1 and lines[0].split()[1] == "openblas" and "decode rows" in lines[0]
    monkeypatch.delenv(gemm.ENV, raising=False)
    gemm.select(None)  # back to this machine's default for the tests after


def test_measure_times_each_library_in_its_own_process(monkeypatch):
    """measure() runs one process per library per round and keeps the best rate per shape."""
    runs = []

    def fake_run(cmd, **kw):
        lib = kw["env"][gemm.ENV]
        runs.append(lib)
        rates = {g: [float(len(runs))] * len(s) for g, s in gemm.SHAPES.items()}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(rates) + "\n")
    monkeypatch.setattr(gemm.subprocess, "run", fake_run)
    monkeypatch.setattr(gemm, "available", lambda: ["openblas", "mkl"])
    got = gemm.measure(rounds=2)
    assert runs == ["openblas", "mkl", "openblas", "mkl"]
    assert got["openblas"]["head"] == [3.0, 3.0] and got["mkl"]["training"][0] == 4.0


def test_measure_here_reports_a_rate_for_every_shape():
    code = ("import json; from numgpt.core import gemm; "
            "r = gemm.measure_here('openblas', 0.001); print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rates = json.loads(out.stdout.splitlines()[-1])
    assert {g: len(v) for g, v in rates.items()} == {g: len(s) for g, s in gemm.SHAPES.items()}
    assert all(r > 0 for v in rates.values() for r in v)


def test_layout_reads_views_in_place_and_refuses_what_cblas_cannot_read():
    x = np.zeros((4, 6), np.float32)
    assert gemm._layout(x) == (111, 6)
    assert gemm._layout(x.T) == (112, 6)
    assert gemm._layout(np.zeros((4, 10), np.float32)[:, 1:7]) == (111, 10)
    assert gemm._layout(x[:, ::2]) is None and gemm._layout(x[::-1]) is None
    assert gemm._layout(np.zeros((1, 5), np.float64)[:, :]) == (111, 5)
    assert ctypes.sizeof(ctypes.c_int) == 4  # CBLAS's int in the LP64 interface


@NEEDS_MKL
def test_mkl_loaded_after_torch_is_refused_by_its_probe_and_auto_falls_back():
    """The probe's negative case: with torch imported first, MKL's products came out wrong
    (torch's copy of MKL owns the symbols). select('mkl') refuses in one line; auto, on a CPU
    whose rule says mkl, takes openblas and says why."""
    pytest.importorskip("torch")
    code = ("import torch, numpy as np\n"
            "from numgpt.core import gemm\n"
            "from numgpt.errors import ConfigError\n"
            "gemm.cpu_vendor = lambda: 'GenuineIntel'\n"
            "gemm.record_path = lambda: __import__('pathlib').Path('/nonexistent/gemm.json')\n"
            "try:\n    gemm.select('mkl'); print('ACCEPTED')\n"
            "except ConfigError as e:\n    print('REFUSED', e)\n"
            "print('AUTO', gemm.select('auto'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(gemm.__file__).parents[2])})
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED ") and "wrong cblas_sgemm product" in lines[0] \
        and "--gemm openblas" in lines[0], out.stdout + out.stderr
    assert lines[1] == "AUTO openblas"


def test_compile_records_the_measured_choice_that_auto_then_takes(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "record_path", lambda: tmp_path / "gemm.json")
    monkeypatch.setattr(gemm, "_mkl_candidates", lambda: ["/some/libmkl_rt.so"])
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "AuthenticAMD")  # the rule would say openblas
    fast = {g: [200.0] * len(s) for g, s in gemm.SHAPES.items()}
    slow = {g: [100.0] * len(s) for g, s in gemm.SHAPES.items()}
    monkeypatch.setattr(gemm, "measure", lambda: {"openblas": slow, "mkl": fast})
    cli._measure_gemm()
    out = capsys.readouterr().out
    assert f"GEMM library for --gemm auto on this {gemm.cpu_model()}: mkl (mkl/openblas speed 2.00x" in out
    assert json.loads((tmp_path / "gemm.json").read_text())[gemm.cpu_model()]["gflops"]["mkl"] == fast
    lib, why = gemm.resolve()
    assert lib == "mkl" and "measured on this" in why


def test_serve_names_the_kernel_for_each_decode_row_count_at_start(monkeypatch, capsys):
    monkeypatch.delenv(gemm.ENV, raising=False)
    cli._note_gemm(argparse.Namespace(command="serve", gemm="openblas"))
    err = capsys.readouterr().err
    assert err == f"numgpt: GEMM library openblas: asked for by --gemm; decode rows: {gemm.decode_rows_text()}\n"
    assert "1 row -> the selected library's GEMM" in err and "4-64 rows -> the selected library's GEMM" in err
    monkeypatch.delenv(gemm.ENV, raising=False)


@NEEDS_MKL
def test_the_cli_loads_mkl_before_torch_can_so_mkl_works_beside_it():
    """`numgpt trace --reference-hf` imports torch after the CLI starts: the CLI loads MKL
    first (the test above shows the other order refused), and products are then right."""
    pytest.importorskip("torch")
    code = ("import argparse\n"
            "from numgpt import cli\n"
            "cli._note_gemm(argparse.Namespace(command='trace', gemm='mkl'))\n"
            "import torch, numpy as np\n"
            "from numgpt.core import gemm\n"
            "print(gemm.select())\n"
            "a = np.arange(96, dtype=np.float32).reshape(6, 16) % 7; b = np.arange(768, dtype=np.float32).reshape(16, 48) % 5\n"
            "print(np.array_equal(gemm.mm(a, b), a @ b))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(gemm.__file__).parents[2])})
    assert out.stdout.split() == ["mkl", "True"], out.stdout + out.stderr


def test_compile_does_not_measure_while_numgpt_gemm_fixes_the_library(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gemm, "record_path", lambda: tmp_path / "gemm.json")
    monkeypatch.setattr(gemm, "measure", lambda: pytest.fail("measured although the library is fixed"))
    monkeypatch.setenv(gemm.ENV, "openblas")
    cli._measure_gemm()
    assert "GEMM library fixed by NUMGPT_GEMM=openblas: not measured" in capsys.readouterr().out
    assert not (tmp_path / "gemm.json").exists()
    monkeypatch.setenv(gemm.ENV, "bogus")
    with pytest.raises(ConfigError, match="'bogus'"):
        cli._measure_gemm()
