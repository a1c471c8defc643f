"""Named hook points (numgpt/core/hooks.py) against TransformerLens on the same weights.

One random-weight GPT-2 folder (tests/tl_oracle.py) is loaded by ``numgpt.load`` and booted
by TransformerLens 4.x's ``TransformerBridge`` (raw numerics, nothing folded). The gate:
every hook point TransformerLens also has equals its activation within 1e-5 in float32 and
1e-10 in float64, on a small model and a 124M-shaped one; a hook that replaces an activation
changes numgpt's logits as it changes TransformerLens's. Negative controls: a position off
by one and two heads swapped fail the same gate. Rows go to docs/results/inspect_parity.md.
"""

from __future__ import annotations

import numpy as np
import pytest

import results_table
from tl_oracle import GPT2_124M, SMALL, boot, hf_folder, max_diff, to_numpy, torch

import numgpt
from numgpt.core import hooks as hooks_module
from numgpt.core.hooks import hook_names
from numgpt.core.model import GPT
from numgpt.errors import InputError

TOL = {"float32": 1e-5, "float64": 1e-10}
IDS = np.array([[464, 3290, 373, 257, 1310, 13, 383, 3290],
                [15496, 13, 314, 1101, 257, 1310, 2739, 284]])  # (2, 8)
NUMGPT_ONLY = {"attn.hook_cache_k", "attn.hook_cache_v"}  # not TransformerLens points


def _row(case: str, diff: float, gate: str, ok: bool) -> None:
    results_table.record("inspect_parity.md", case, f"{diff:.3g}", gate, "PASS" if ok else "FAIL")


def gate(ours: dict, theirs: dict, tol: float) -> tuple[float, list[str]]:
    """(max abs diff over every shared point, the points beyond ``tol``); a point missing from
    TransformerLens's cache fails."""
    worst, bad = 0.0, []
    for name, a in ours.items():
        if name.split(".", 2)[-1] in NUMGPT_ONLY:
            continue
        d = max_diff(a, to_numpy(theirs[name])) if name in theirs else float("inf")
        worst = max(worst, d)
        if not d <= tol:
            bad.append(name)
    return worst, bad


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("small"), SMALL, seed=0)


@pytest.fixture(scope="module")
def small_runs(small_folder):
    """dtype -> (numgpt cache, TransformerLens cache, numgpt logits, TL logits) on IDS."""
    runs = {}
    for dtype in ("float32", "float64"):
        model = numgpt.load(small_folder, dtype=dtype)
        logits, cache = model.run_with_cache(IDS)
        tl_logits, tl_cache = boot(small_folder, dtype).run_with_cache(torch.tensor(IDS))
        runs[dtype] = cache, tl_cache, logits, to_numpy(tl_logits)
    return runs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_hook_point_equals_transformer_lens_small(small_runs, dtype):
    ours, theirs, logits, tl_logits = small_runs[dtype]
    assert set(ours) == set(hook_names(SMALL["n_layer"]))
    assert ours["blocks.1.attn.hook_z"].shape == (2, 8, 4, 16)  # (B, T, nh, hs)
    assert ours["blocks.1.attn.hook_pattern"].shape == (2, 4, 8, 8)  # (B, nh, Tq, Tk)
    worst, bad = gate(ours, theirs, TOL[dtype])
    worst = max(worst, max_diff(logits, tl_logits))
    _row(f"hook points, 2-layer, {dtype}: {len(ours)} points and logits", worst,
         f"<= {TOL[dtype]:g}", not bad and worst <= TOL[dtype])
    assert not bad, f"{bad} differ from TransformerLens by more than {TOL[dtype]}"
    assert worst <= TOL[dtype]
    masked = ours["blocks.0.attn.hook_attn_scores"][0, 0, 0, 1]  # query 0 cannot see key 1
    assert masked == np.finfo(dtype).min  # TransformerLens's (HF eager's) convention, not -inf


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gate_fails_on_a_position_off_by_one_and_on_swapped_heads(small_runs, dtype):
    """Negative controls: the gate above must reject a shifted position and swapped heads."""
    ours, theirs, _, _ = small_runs[dtype]
    resid = "blocks.1.hook_resid_post"
    shifted = dict(ours, **{resid: np.roll(ours[resid], 1, axis=1)})  # position t holds t - 1
    z = "blocks.0.attn.hook_z"
    swapped = dict(ours, **{z: ours[z][:, :, [1, 0, 2, 3]]})  # heads 0 and 1 exchanged
    for what, case in (("position off by one", shifted), ("heads 0 and 1 swapped", swapped)):
        worst, bad = gate(case, theirs, TOL[dtype])
        _row(f"negative control, {dtype}: {what}", worst, f"must exceed {TOL[dtype]:g}", bool(bad))
        assert bad == [resid if case is shifted else z], what


def _edits():
    """(name, fn) edits, each TransformerLens-style: return a new array or edit in place."""
    def zero_head_1(z, hook):
        z[:, :, 1] = 0.0  # in place
    def attend_to_first(p, hook):
        p[...] = 0.0
        p[..., 0] = 1.0
    def scale_stream(x, hook):
        return 1.5 * x
    def flip_normalized(n, hook):
        return -n
    def sharpen_q(q, hook):
        return q * 30.0
    def kill_post(h, hook):
        return h * 0
    return [("blocks.0.attn.hook_z", zero_head_1), ("blocks.1.attn.hook_pattern", attend_to_first),
            ("blocks.1.hook_resid_pre", scale_stream), ("blocks.1.ln2.hook_normalized", flip_normalized),
            ("blocks.1.attn.hook_q", sharpen_q), ("blocks.0.mlp.hook_post", kill_post)]


def _torch_edit(fn):
    """The same edit on a torch activation (via NumPy), for TransformerLens's run_with_hooks."""
    def hook(activation, hook):
        a = to_numpy(activation).copy()
        out = fn(a, hook)
        return torch.tensor(a if out is None else out, dtype=activation.dtype)
    return hook


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("edit", range(6))
def test_replacing_an_activation_changes_logits_as_in_transformer_lens(small_folder, small_runs, dtype,
                                                                       edit):
    name, fn = _edits()[edit]
    model, bridge = numgpt.load(small_folder, dtype=dtype), boot(small_folder, dtype)
    ours = model.run_with_hooks(IDS, [(name, fn)])
    theirs = to_numpy(bridge.run_with_hooks(torch.tensor(IDS), fwd_hooks=[(name, _torch_edit(fn))]))
    clean = small_runs[dtype][2]
    change = max_diff(ours, clean)
    assert change > 100 * TOL[dtype], f"the edit at {name} did not change the logits ({change})"
    d = max_diff(ours, theirs)
    _row(f"hook edit, {dtype}: {name} ({fn.__name__})", d, f"<= {TOL[dtype]:g}", d <= TOL[dtype])
    assert d <= TOL[dtype]


def test_resid_mid_edit_is_the_residual_stream_as_in_hooked_transformer(small_folder):
    """TransformerBridge 4.3 aliases hook_resid_mid to ln2.hook_in, so an edit there reaches
    only the MLP's input; numgpt follows HookedTransformer, where it is the stream itself.
    Oracle: the same stream, 1.5 (resid_pre + attn_out), built in the bridge from its own
    hook_resid_pre and hook_attn_out."""
    model, bridge = numgpt.load(small_folder, dtype="float64"), boot(small_folder, "float64")
    ours = model.run_with_hooks(IDS, [("blocks.0.hook_resid_mid", lambda x, h: 1.5 * x)])
    seen = {}

    def keep(x, hook):
        seen["pre"] = x.clone()

    def stream(a, hook):
        return 0.5 * seen["pre"] + 1.5 * a  # resid_pre + this = 1.5 (resid_pre + attn_out)
    theirs = to_numpy(bridge.run_with_hooks(torch.tensor(IDS), fwd_hooks=[
        ("blocks.0.hook_resid_pre", keep), ("blocks.0.hook_attn_out", stream)]))
    bridge_alias = to_numpy(bridge.run_with_hooks(torch.tensor(IDS), fwd_hooks=[
        ("blocks.0.hook_resid_mid", lambda x, hook: 1.5 * x)]))
    d = max_diff(ours, theirs)
    _row("hook edit, float64: blocks.0.hook_resid_mid x1.5 (the stream)", d, "<= 1e-10", d <= 1e-10)
    assert d <= 1e-10
    assert max_diff(ours, bridge_alias) > 1e-3  # the bridge's alias really is different


@pytest.fixture(scope="module")
def folder_124m(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("gpt2-124m"), GPT2_124M, seed=1, mlp_scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_hook_point_equals_transformer_lens_124m(folder_124m, dtype):
    ids = IDS[:1]
    model = numgpt.load(folder_124m, dtype=dtype)
    names = lambda n: not n.endswith("attn.hook_cache_k") and not n.endswith("attn.hook_cache_v")  # noqa: E731
    logits, ours = model.run_with_cache(ids, names)
    del model
    tl_logits, theirs = boot(folder_124m, dtype).run_with_cache(torch.tensor(ids))
    worst, bad = gate(ours, theirs, TOL[dtype])
    worst = max(worst, max_diff(logits, to_numpy(tl_logits)))
    ok = not bad and worst <= TOL[dtype]
    _row(f"hook points, 124M shape, {dtype}: {len(ours)} points and logits", worst, f"<= {TOL[dtype]:g}", ok)
    assert ok, bad


# ------------------------------------------------------------------ numgpt's own contract

@pytest.fixture(scope="module")
def tiny():
    from numgpt.core.config import GPTConfig
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=16), seed=3)


def test_no_hook_forward_never_enters_the_hook_machinery(tiny, monkeypatch):
    ids = np.array([[1, 2, 3, 4]])
    before = tiny.forward_cached(ids, tiny.new_cache(1, 4), all_logits=True)

    def boom(*args, **kwargs):
        raise AssertionError("hook machinery ran without a hook")
    monkeypatch.setattr(GPT, "_hooked_layers", boom)
    monkeypatch.setattr(hooks_module.Hooks, "__init__", boom)
    monkeypatch.setattr(hooks_module.Hooks, "__call__", boom)
    after = tiny.forward_cached(ids, tiny.new_cache(1, 4), all_logits=True)
    assert np.array_equal(before, after)
    tiny(ids)  # the training path too
    with pytest.raises(AssertionError, match="hook machinery"):  # the patch does bite
        tiny.run_with_hooks(ids, [])


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_reading_hooks_leave_the_logits_unchanged(tiny, kernels):
    tiny.set_kernels(kernels)
    ids = np.array([[5, 6, 7, 8, 9]])
    plain = tiny.forward_cached(ids, tiny.new_cache(1, 5), all_logits=True)
    read_only, cache = tiny.run_with_cache(ids, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_q"])
    assert np.array_equal(read_only, plain)  # fused path kept: bit-identical
    everything, cache = tiny.run_with_cache(ids)  # unfused attention, LayerNorm from normalized
    assert np.abs(everything - plain).max() < 1e-5
    resid = cache["blocks.0.hook_resid_pre"]
    assert np.array_equal(resid, cache["hook_embed"] + cache["hook_pos_embed"])
    assert np.allclose(cache["blocks.0.hook_resid_mid"], resid + cache["blocks.0.hook_attn_out"])
    tiny.set_kernels("fast")


def test_unknown_name_wrong_shape_and_read_only_points_are_one_line_errors(tiny):
    ids = np.array([[1, 2]])
    with pytest.raises(InputError, match=r"unknown hook point 'blocks.0.attn.hook_patern'.*"
                                         r"did you mean blocks.0.attn.hook_pattern"):
        tiny.run_with_hooks(ids, [("blocks.0.attn.hook_patern", lambda a, h: None)])
    with pytest.raises(InputError, match="unknown hook point 'blocks.7.hook_resid_pre'"):
        tiny.run_with_cache(ids, ["blocks.7.hook_resid_pre"])
    with pytest.raises(InputError, match=r"returned shape \(1, 2\); the activation there is \(1, 2, 16\)"):
        tiny.run_with_hooks(ids, [("blocks.0.hook_resid_pre", lambda a, h: a[..., 0])])
    with pytest.raises(InputError, match="17 positions, more than the context length block_size=16"):
        tiny.run_with_cache(np.ones(17, dtype=int))
    with pytest.raises(InputError, match="non-empty"):
        tiny.run_with_hooks(np.zeros((1, 0), dtype=int))
    with pytest.raises(InputError, match="read-only"):
        tiny.run_with_hooks(ids, [("blocks.0.attn.hook_cache_k", lambda a, h: a * 2)])


def test_hook_sees_its_name_and_layer_and_a_predicate_selects_points(tiny):
    seen = []
    tiny.run_with_hooks(np.array([[1, 2, 3]]), [(lambda n: n.endswith("hook_resid_post"),
                                                lambda a, h: seen.append((h.name, h.layer())))])
    assert seen == [("blocks.0.hook_resid_post", 0), ("blocks.1.hook_resid_post", 1)]


def test_hooks_run_on_a_q8_0_model_and_attribution_refuses_it():
    from numgpt.core.config import GPTConfig
    from numgpt.core.quant import quantize_model
    from numgpt.inspect import attribute

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16), seed=4)
    q8 = quantize_model(model)
    ids = np.array([[1, 2, 3, 4, 5]])
    plain = q8.forward_cached(ids, q8.new_cache(1, 5), all_logits=True)
    logits, cache = q8.run_with_cache(ids, ["blocks.1.hook_resid_post", "blocks.0.attn.hook_v"])
    assert np.array_equal(logits, plain) and cache["blocks.0.attn.hook_v"].shape == (1, 5, 2, 16)
    everything, _ = q8.run_with_cache(ids)
    assert np.abs(everything - plain).max() < 1e-5
    with pytest.raises(InputError, match="load the float checkpoint"):
        attribute(q8, [1, 2, 3], 4)
