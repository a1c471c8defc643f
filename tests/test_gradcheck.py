"""Rung 1 of the verification ladder: the gradient-check gate passes on every op, fails on
the negative control, and is tight enough to catch a backward that is off by 0.1%.

The gate runs on both op paths: "reference" (the NumPy ops) and "fast" (the compiled kernels
where they exist, ``numgpt.core.kernels``), each with its own negative control. Writes
``docs/results/gradcheck.md`` (reference) and ``docs/results/gradcheck_fast.md`` from the runs.
"""

from __future__ import annotations


import numpy as np
import pytest

from numgpt.verify import gradcheck
from numgpt.verify import op_cases as op_table

from numgpt.core import kernels, ops

import results_table  # noqa: E402  (tests/results_table.py)

RESULTS_DIR = results_table.results_dir()  # docs/results/ under --write-results
RESULTS = {"reference": RESULTS_DIR / "gradcheck.md", "fast": RESULTS_DIR / "gradcheck_fast.md"}


@pytest.fixture(scope="module", params=["reference", "fast"])
def path(request):
    return request.param


@pytest.fixture(scope="module")
def results(path):
    results = gradcheck.run_gate(include_composites=True, path=path)
    gradcheck.write_table(results, RESULTS[path], op_path=path)
    return results


def test_every_op_check_passes(results):
    failing = [f"{r.name} [{r.input}]: abs {r.max_abs_err:.2e}, rel {r.max_rel_err:.2e}"
               for r in results if not r.expect_fail and not r.passed]
    assert not failing, "gradient checks failed:\n" + "\n".join(failing)


def test_gate_covers_every_op_and_composite_with_at_least_92_checks(results):
    checks = [r for r in results if not r.expect_fail]
    assert len(checks) >= 92
    for composite in ("multi-head attention", "pre-LN block", "weight-tied GPT"):
        assert any(composite in r.name for r in checks), f"no composite check for {composite}"
    names = " ".join(r.name for r in checks)
    assert {e.name for e in op_table.TABLE} == set(ops.__all__) - {"unbroadcast"}
    forward_only = {e.name for e in op_table.TABLE if not e.differentiable}
    assert forward_only == {"attention_inference"}  # no backward, so nothing to check
    for op in set(ops.__all__) - {"unbroadcast"} - forward_only:
        assert op in names, f"no gradient check for ops.{op}"


def test_fast_gate_checks_the_kernels_not_the_reference_ops():
    """The fast path's op cases run the compiled kernels (each kernel with a backward)."""
    rng = np.random.default_rng(0)
    fast = {name.split(":")[0]: op for name, op, *_ in gradcheck.op_cases(rng, "fast")}
    with_backward = set(kernels.FAST_OPS) - {"attention_inference", "cached_attention"}
    assert {"layernorm", "gelu", "gelu_tanh", "cross_entropy", "embedding"} <= with_backward
    for name in with_backward:
        assert fast[name] is getattr(kernels, name), name
    assert fast["linear"] is ops.linear  # no kernel: the reference op on both paths


def test_negative_control_fails_by_an_order_one_error(results, path):
    controls = [r for r in results if r.expect_fail]
    assert len(controls) == 1
    control = controls[0]
    assert not control.passed and control.ok
    assert control.max_abs_err > 0.1
    assert ("fast" in control.name) == (path == "fast")  # each path has its own control


def _scaled_backward(op, factor):
    def wrong(*inputs, **consts):
        out, backward = op(*inputs, **consts)
        return out, lambda dout: tuple(factor * g for g in backward(dout))
    return wrong


@pytest.mark.parametrize("op,inputs,consts", [
    (ops.scale, [np.random.default_rng(0).standard_normal((3, 4))], {"c": -1.7}),
    (ops.gelu_tanh, [np.random.default_rng(1).standard_normal((3, 4))], {}),
    (ops.layernorm, [np.random.default_rng(2).standard_normal((2, 6)), np.ones(6), np.zeros(6)], {}),
], ids=["scale", "gelu_tanh", "layernorm"])
def test_gate_flags_a_gradient_off_by_a_tenth_of_a_percent(op, inputs, consts):
    right = gradcheck.check_op("right", op, inputs, consts)
    assert all(r.passed for r in right)
    wrong = gradcheck.check_op("wrong", _scaled_backward(op, 1.001), inputs, consts)
    assert not any(r.passed for r in wrong)
    assert all(r.max_rel_err > 5e-4 for r in wrong)


def test_results_table_is_written(results, path):
    text = RESULTS[path].read_text()
    assert f"{path} path" in text
    n = sum(1 for r in results if not r.expect_fail)
    assert f"{n} of {n} checks pass" in text
    assert "fails as it must" in text
    assert text.count("\n| ") == len(results) + 1  # header row plus one row per check


def test_cli_gradcheck_prints_the_table_and_writes_no_file_without_out(tmp_path, monkeypatch, capsys):
    """`numgpt gradcheck` run from any folder used to write ./docs/results/gradcheck_fast.md there."""
    from numgpt import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["gradcheck", "--path", "reference"]) == 0
    out = capsys.readouterr().out
    assert "NEGATIVE CONTROL" in out and "negative control FAILED as it must" in out
    assert "written" not in out
    assert list(tmp_path.iterdir()) == []


def test_cli_gradcheck_writes_the_table_with_out(tmp_path, capsys):
    from numgpt import cli

    target = tmp_path / "tables" / "gc.md"
    assert cli.main(["gradcheck", "--path", "reference", "--out", str(target)]) == 0
    assert f"table written to {target}" in capsys.readouterr().out
    text = target.read_text()
    assert text.startswith("# Gradient check gate, reference path") and "NEGATIVE CONTROL" in text
