"""Every gate runs with each GEMM library (issue 19): the gradient-check gate, layer parity,
model parity, one training step and the 100-step curve against PyTorch, and greedy
generation against transformers, rerun here with oneMKL selected (``gemm.select("mkl")``).

The default runs (tests/test_gradcheck.py, test_nn.py, ...) use the machine's default
library (``--gemm auto``: OpenBLAS on this AMD EPYC without a recorded measurement); this file
reruns the same gate functions, with the same tolerances and negative controls, on the
other one, and checks that MKL really ran their products (its sgemm/dgemm calls are counted).
Nothing here writes a results table. Skipped, with the reason, where oneMKL is not installed.
"""
from __future__ import annotations

import numpy as np
import pytest

from numgpt.core import gemm

if "mkl" not in gemm.available():
    pytest.skip("oneMKL is not installed (pip install 'numgpt[mkl]'): the gates ran with "
                "OpenBLAS only", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


import test_model_parity as model_parity  # noqa: E402
import test_nn as layer_parity  # noqa: E402
import test_sample as sample  # noqa: E402
import test_train_parity as train_parity  # noqa: E402

from numgpt.verify import gradcheck  # noqa: E402

PATHS = ("reference", "fast")


@pytest.fixture(scope="module")
def mkl_calls():
    """oneMKL selected for the module, every sgemm/dgemm call counted by dtype; the previous
    library selected again after."""
    before = gemm.current()
    gemm.select("mkl")
    lib = gemm._mkl
    calls = {"cblas_sgemm": 0, "cblas_dgemm": 0}
    originals = {name: getattr(lib, name) for name in calls}

    def counted(name):
        def call(*args):
            calls[name] += 1
            return originals[name](*args)
        return call
    for name in calls:
        setattr(lib, name, counted(name))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: as the gate modules do
    yield calls
    torch.set_num_threads(torch_threads)
    for name, fn in originals.items():
        setattr(lib, name, fn)
    gemm.select(before)


def _ran_on_mkl(calls, before: dict, dtypes=("cblas_sgemm", "cblas_dgemm")) -> bool:
    return all(calls[d] > before[d] for d in dtypes)


@pytest.mark.parametrize("path", PATHS)
def test_gradient_gate_passes_with_mkl_and_its_control_fails(mkl_calls, path):
    before = dict(mkl_calls)
    results = gradcheck.run_gate(include_composites=True, path=path)
    failing = [f"{r.name} [{r.input}]" for r in results if not r.expect_fail and not r.passed]
    assert not failing, failing
    controls = [r for r in results if r.expect_fail]
    assert len(controls) == 1 and not controls[0].passed and controls[0].max_abs_err > 0.1
    assert _ran_on_mkl(mkl_calls, before, ("cblas_dgemm",))  # the gate is float64


def test_layer_parity_with_mkl(mkl_calls):
    before = dict(mkl_calls)
    bad = [f"{r.layer} {r.quantity}: {r.abs_diff:.2e}/{r.rel_diff:.2e}"
           for layer, make in layer_parity.CASES.items()
           for r in layer_parity.compare(layer, make()) if not r.passed]
    assert not bad, bad
    layer_parity.test_comparison_catches_a_transposed_weight()  # its control, on mkl
    assert _ran_on_mkl(mkl_calls, before, ("cblas_dgemm",))


def test_model_parity_float32_and_float64_with_mkl_and_the_mask_control(mkl_calls, tmp_path):
    before = dict(mkl_calls)
    for name, shape, seed in (("tiny", model_parity.TINY, 0), ("tiny-gelu", model_parity.TINY_GELU, 1)):
        rows = model_parity._positive(shape, name, tmp_path / name, B=2, T=16, seed=seed)
        assert model_parity.passes(rows), model_parity._failures(rows)
    for rows in model_parity._by_path(model_parity._control_no_causal_mask(tmp_path / "nomask")).values():
        assert len(rows) and not model_parity.passes(rows)
    assert _ran_on_mkl(mkl_calls, before)


@pytest.mark.parametrize("path", PATHS)
def test_one_training_step_and_the_100_step_curve_match_pytorch_with_mkl(mkl_calls, path):
    before = dict(mkl_calls)
    step = train_parity.one_step(path=path)
    assert abs(step["loss"] - step["ref_loss"]) < 1e-12
    assert all(r["diff"] <= train_parity.STEP_TOL for r in step["rows"]), step["rows"]
    assert max(r["diff"] for r in train_parity.one_step(grad_clip=0.0, path=path)["rows"]) \
        > train_parity.STEP_TOL  # the step's control, on mkl
    curve = train_parity.curve(path=path)
    diffs = np.abs(np.array(curve["numgpt"]) - np.array(curve["torch"]))
    assert curve["numgpt"][-1] < curve["numgpt"][0] - 1.0 and np.all(diffs < train_parity.CURVE_TOL), \
        f"worst step difference {diffs.max():.4f}"
    assert _ran_on_mkl(mkl_calls, before)


SMALL = dict(n_layer=2, n_head=4, n_embd=128)  # GPT-2's vocabulary and context, 2 small layers


def test_greedy_tokens_equal_transformers_generate_with_mkl(mkl_calls, tmp_path):
    import numgpt

    expected, margin = sample.hf_greedy(SMALL, tmp_path, seed=3)
    assert margin > 1e-3 and len(set(expected)) > 1, "the check needs clear, varied argmaxes"
    model = numgpt.load(tmp_path)
    before = dict(mkl_calls)
    for path in PATHS:
        model.set_kernels(path)
        assert sample.generate(model, sample.PROMPT, sample.N_NEW, sample.GREEDY) == expected, path
    assert _ran_on_mkl(mkl_calls, before, ("cblas_sgemm",))
    p = model.parameters()["h.0.mlp.c_fc.weight"]  # control: a perturbed model must not match
    p.data += np.random.default_rng(0).normal(0, 0.5, p.data.shape).astype(p.data.dtype)
    assert sample.generate(model, sample.PROMPT, sample.N_NEW, sample.GREEDY) != expected
