"""Checkpoints: every source loads and matches its reference, round trips are bit-identical,
exports load in transformers, every broken input is refused by name, writes are atomic.

References are independent: ``transformers.GPT2LMHeadModel`` for HF folders, exports and
the nanoGPT import (a nanoGPT-layout state dict built here from an HF model with exact
GELU, the same math as nanoGPT's model). The model-level gate with gradients and the 124M
shape is ``tests/test_model_parity.py``.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import numgpt  # noqa: E402
from numgpt.io import checkpoint# noqa: E402
from numgpt.cli import main  # noqa: E402
from numgpt.errors import CheckpointError, ConfigError  # noqa: E402
from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.core.tensor import no_grad  # noqa: E402
from numgpt.io.tokenizer import ByteTokenizer, GPT2Tokenizer  # noqa: E402

TINY = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
LINEAR = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ------------------------------------------------------------------------ helpers

def make_hf(seed: int = 0, **overrides):
    """A small GPT2LMHeadModel, dropout off, with random biases and LayerNorm parameters."""
    config = transformers.GPT2Config(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="eager",
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)  # HF's initialiser uses torch's global generator
    hf = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return hf


def hf_logits(hf, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(idx)).logits.numpy()


def logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(idx)[0].data


def ids(vocab: int = TINY["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (2, 9))


def same_weights(a: GPT, b: GPT) -> bool:
    pa, pb = a.parameters(), b.parameters()
    return list(pa) == list(pb) and all(
        pa[n].data.dtype == pb[n].data.dtype and np.array_equal(pa[n].data, pb[n].data) for n in pa)


def rewrite_weights(folder: Path, edit) -> None:
    """Load model.safetensors, let ``edit`` change the dict, write it back."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def hf_ref():
    """(HF model in float64, its float32 folder saved with save_pretrained)."""
    import tempfile

    hf = make_hf(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        yield hf.double(), Path(tmp)


@pytest.fixture()
def hf_folder(hf_ref, tmp_path) -> Path:
    """A fresh, editable copy of the reference folder."""
    import shutil

    return Path(shutil.copytree(hf_ref[1], tmp_path / "hf"))


def tiny_numgpt(dtype: str = "float32", seed: int = 3, **overrides) -> GPT:
    return GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32,
                         dtype=dtype, **overrides), seed=seed)


# ----------------------------------------------------------- Hugging Face folders

def test_hf_safetensors_folder_loads_with_its_config_and_matches_transformers(hf_ref, hf_folder):
    hf, _ = hf_ref
    model = numgpt.load(hf_folder, dtype="float64")
    assert model.config == GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                     activation="gelu_tanh", layer_norm_epsilon=1e-5, dtype="float64")
    assert model.source["format"] == "hf" and model.tokenizer is None
    assert "no tokenizer" in model.source["notes"][0]
    idx = ids()
    assert np.max(np.abs(logits(model, idx) - hf_logits(hf, idx))) < 1e-12


def test_hf_folder_keeps_stored_float32_and_accepts_any_path_form(hf_folder):
    for path in (hf_folder, hf_folder / "config.json", hf_folder / "model.safetensors"):
        model = numgpt.load(path)
        assert model.wte.weight.data.dtype == np.float32 and model.config.dtype == "float32"
    assert numgpt.load(hf_folder, dtype=np.float64).wte.weight.data.dtype == np.float64
    with pytest.raises(ConfigError, match="int8"):
        numgpt.load(hf_folder, dtype="int8")


def test_hf_exact_gelu_and_epsilon_are_read_from_config_json(tmp_path):
    hf = make_hf(1, activation_function="gelu", layer_norm_epsilon=1e-6).double()
    hf.save_pretrained(tmp_path)
    model = numgpt.load(tmp_path, dtype="float64")
    assert (model.config.activation, model.config.layer_norm_epsilon) == ("gelu", 1e-6)
    idx = ids()
    assert np.max(np.abs(logits(model, idx) - hf_logits(hf, idx))) < 1e-12


def _write_bin(hf, folder: Path, prefix: str, buffers: bool) -> None:
    """pytorch_model.bin as older transformers wrote it (transformers 5 always writes
    safetensors, even with safe_serialization=False): optional ``transformer.`` prefix,
    the tied ``lm_head.weight``, and the attention mask buffers."""
    state = {(k if k.startswith("lm_head") else prefix + k.removeprefix("transformer.")): v
             for k, v in hf.state_dict().items()}
    if buffers:
        n = hf.config.n_positions
        for i in range(hf.config.n_layer):
            state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
            state[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize("prefix,buffers", [("transformer.", True), ("", False)])
def test_hf_pytorch_bin_folder_loads_and_matches(hf_ref, hf_folder, prefix, buffers):
    hf, _ = hf_ref
    _write_bin(make_hf(0), hf_folder, prefix, buffers)
    model = numgpt.load(hf_folder, dtype="float64")
    assert model.source["weights"].endswith("pytorch_model.bin")
    idx = ids()
    assert np.max(np.abs(logits(model, idx) - hf_logits(hf, idx))) < 1e-12


def test_pytorch_bin_without_torch_says_torch_is_needed(hf_folder, monkeypatch):
    _write_bin(make_hf(0), hf_folder, "transformer.", False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a PyTorch pickle; reading it needs torch"):
        numgpt.load(hf_folder)


def test_sharded_and_bfloat16_folders_load(hf_ref, tmp_path):
    hf, _ = hf_ref
    hf32 = make_hf(0)
    hf32.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    idx = ids()
    model = numgpt.load(tmp_path / "sharded", dtype="float64")
    assert np.max(np.abs(logits(model, idx) - hf_logits(hf, idx))) < 1e-12
    hf32.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = numgpt.load(tmp_path / "bf16")  # numpy has no bfloat16: widened to float32 exactly
    assert model.wte.weight.data.dtype == np.float32
    assert np.array_equal(model.wte.weight.data, hf32.transformer.wte.weight.float().detach().numpy())


def test_hf_folder_with_gpt2_bpe_files_attaches_the_tokenizer(hf_folder, gpt2_tokenizer_dir):
    GPT2Tokenizer.from_folder(gpt2_tokenizer_dir).save_files(hf_folder)
    model = numgpt.load(hf_folder)
    assert isinstance(model.tokenizer, GPT2Tokenizer)
    assert model.tokenizer.encode("Hello.") == [15496, 13]
    assert any("exceeds the model's vocab_size" in n for n in model.source["notes"])  # 50257 > 97


def test_identical_separate_lm_head_is_accepted(hf_folder):
    rewrite_weights(hf_folder, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].copy()}))
    assert numgpt.load(hf_folder).config.n_layer == 2


# ---------------------------------------------------------------------- nanoGPT

def _nanogpt_ckpt(hf, path: Path, bias: bool = True) -> None:
    """A ckpt.pt as nanoGPT's train.py writes it (torch.compile'd model): ``_orig_mod.``
    prefixes, nn.Linear weights (out, in), tied lm_head, the causal-mask buffer, the
    optimizer state and the run's bookkeeping."""
    sd = {}
    for k, v in hf.state_dict().items():
        if not bias and k.endswith(".bias"):
            continue
        if k.endswith(".weight") and any(f".{layer}." in k for layer in LINEAR):
            v = v.t().contiguous()  # Conv1D (in, out) -> nn.Linear (out, in)
        sd["_orig_mod." + k] = v
    c = hf.config
    for i in range(c.n_layer):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(c.n_positions, c.n_positions))[None, None]
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3)
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                      bias=bias, vocab_size=c.vocab_size, dropout=0.0)
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": model_args,
                "iter_num": 250, "best_val_loss": torch.tensor(1.5),
                "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3}}, path)


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_ckpt_loads_transposed_and_matches_reference(tmp_path, bias):
    hf = make_hf(4, activation_function="gelu")  # nanoGPT's MLP uses exact GELU
    if not bias:  # nanoGPT bias=False == every bias zero
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    _nanogpt_ckpt(hf, tmp_path / "ckpt.pt", bias)
    for path in (tmp_path / "ckpt.pt", tmp_path):  # the file or nanoGPT's out_dir
        model = numgpt.load(path, dtype="float64")
        assert model.source["format"] == "nanogpt"
        assert (model.config.activation, model.config.bias) == ("gelu", bias)
        idx = ids()
        assert np.max(np.abs(logits(model, idx) - hf_logits(hf.double(), idx))) < 1e-12
        hf.float()


def test_nanogpt_without_transpose_would_be_refused_by_shape(tmp_path):
    hf = make_hf(4, activation_function="gelu")
    _nanogpt_ckpt(hf, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    key = "_orig_mod.transformer.h.0.mlp.c_fc.weight"
    ckpt["model"][key] = ckpt["model"][key].t().contiguous()  # (in, out): the wrong layout
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: shape mismatch for 'h\.0\.mlp\.c_fc\.weight': "
                                              r"expected \(32, 128\).*found \(128, 32\)"):
        numgpt.load(tmp_path / "ckpt.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the garbage file
def test_nanogpt_errors_name_the_file(tmp_path):
    torch.save({"model": {}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt: not a nanoGPT checkpoint.*'model_args'"):
        numgpt.load(tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"\x80\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=r"b\.pt: not a readable PyTorch checkpoint"):
        numgpt.load(tmp_path / "b.pt")
    torch.save({"model": {}, "model_args": dict(n_layer=1, n_head=1, n_embd=8, block_size=8,
                                                vocab_size=8, n_kv_head=1)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: model_args has unknown keys \['n_kv_head'\]"):
        numgpt.load(tmp_path / "c.pt")


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numgpt_checkpoint_round_trip_is_bit_identical_with_meta_and_arrays(tmp_path, dtype):
    model = tiny_numgpt(dtype, dropout=0.1, activation="gelu", layer_norm_epsilon=1e-6)
    model.tokenizer = ByteTokenizer()
    arrays = {"adam.m.wte.weight": np.random.default_rng(0).normal(size=(97, 32)).astype(np.float32),
              "step": np.array(250, dtype=np.int64), "flags": np.array([True, False])}
    meta = {"step": 250, "losses": [3.5, float("nan")], "train": {"lr": 6e-4}}
    prefix = checkpoint.save(model, tmp_path / "run" / "ckpt", meta=meta, arrays=arrays)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.json", "ckpt.safetensors"]
    back, meta2, arrays2 = checkpoint.load_checkpoint(prefix)
    assert same_weights(model, back) and back.config == model.config
    assert isinstance(back.tokenizer, ByteTokenizer) and back.source["format"] == "numgpt"
    assert meta2["step"] == 250 and meta2["train"] == {"lr": 6e-4} and np.isnan(meta2["losses"][1])
    assert set(arrays2) == set(arrays)
    assert all(arrays2[k].dtype == v.dtype and np.array_equal(arrays2[k], v) for k, v in arrays.items())
    for path in (prefix, tmp_path / "run" / "ckpt.json", tmp_path / "run" / "ckpt.safetensors"):
        assert same_weights(model, numgpt.load(path))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numgpt_to_hf_to_numgpt_is_bit_identical(tmp_path, dtype):
    model = tiny_numgpt(dtype, dropout=0.1)
    checkpoint.export_hf(model, tmp_path / "hf")
    back = numgpt.load(tmp_path / "hf")
    assert same_weights(model, back) and back.config == model.config


def test_gpt2_tokenizer_travels_through_numgpt_and_hf_formats(tmp_path, gpt2_tokenizer_dir):
    model = tiny_numgpt()
    model.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    checkpoint.export_hf(model, tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "hf" / name).read_bytes() == (gpt2_tokenizer_dir / name).read_bytes()
    checkpoint.save(model, tmp_path / "ck")
    for path in (tmp_path / "hf", tmp_path / "ck"):
        assert numgpt.load(path).tokenizer.encode("Hello.") == [15496, 13]


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("overrides", [{}, {"activation": "gelu", "layer_norm_epsilon": 1e-6},
                                       {"bias": False}], ids=["gpt2", "exact-gelu", "no-bias"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, dtype, tol, overrides):
    model = tiny_numgpt(dtype, **overrides)
    for p in model.parameters().values():  # move biases and LayerNorms off 0/1
        p.data += np.random.default_rng(5).normal(0, 0.1, p.data.shape).astype(p.data.dtype)
    checkpoint.export_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.dtype == {"float32": torch.float32, "float64": torch.float64}[dtype]
    idx = ids()
    assert np.max(np.abs(logits(model, idx) - hf_logits(hf, idx))) < tol


# --------------------------------------------------------------------- refusals

def test_missing_key_is_named(hf_folder):
    rewrite_weights(hf_folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing 1 parameter.*'h\.1\.mlp\.c_fc\.bias'"):
        numgpt.load(hf_folder)


def test_unexpected_key_is_named(hf_folder):
    rewrite_weights(hf_folder, lambda t: t.update({"transformer.h.0.attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 1 unexpected key.*'h\.0\.attn\.q_norm\.weight'"):
        numgpt.load(hf_folder)


def test_shape_mismatch_names_key_expected_and_found(hf_folder):
    key = "transformer.h.1.attn.c_attn.weight"
    rewrite_weights(hf_folder, lambda t: t.update({key: np.ascontiguousarray(t[key].T)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'h\.1\.attn\.c_attn\.weight': "
                                              r"expected \(32, 96\), found \(96, 32\)"):
        numgpt.load(hf_folder)


def test_truncated_safetensors_is_refused_with_the_file_name(hf_folder, tmp_path):
    weights = hf_folder / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 5):
        weights.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
            numgpt.load(hf_folder)
    checkpoint.save(tiny_numgpt(), tmp_path / "ck")
    ours = tmp_path / "ck.safetensors"
    ours.write_bytes(ours.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: not a readable safetensors file"):
        numgpt.load(tmp_path / "ck")


def test_corrupt_json_is_refused_with_the_file_name(hf_folder, tmp_path):
    (hf_folder / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt Hugging Face config, not valid JSON"):
        numgpt.load(hf_folder)
    checkpoint.save(tiny_numgpt(), tmp_path / "ck")
    (tmp_path / "ck.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"ck\.json: corrupt numgpt checkpoint config"):
        numgpt.load(tmp_path / "ck")


def test_non_gpt2_architecture_is_refused_by_name(hf_folder):
    edit_json(hf_folder / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"model_type 'llama', architectures \['LlamaForCausalLM'\].*GPT-2 only"):
        numgpt.load(hf_folder)
    edit_json(hf_folder / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"],
              scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        numgpt.load(hf_folder)


def test_untied_lm_head_is_refused(hf_folder):
    def untie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + np.float32(0.01)
    rewrite_weights(hf_folder, untie)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' differs from 'wte\.weight' \(max abs diff 0\.01\)"):
        numgpt.load(hf_folder)


def test_unknown_activation_is_refused_by_name(hf_folder):
    edit_json(hf_folder / "config.json", activation_function="relu")
    with pytest.raises(CheckpointError, match=r"config\.json: activation_function 'relu' is not supported"):
        numgpt.load(hf_folder)


def test_missing_paths_and_wrong_formats_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at '.*nowhere'"):
        numgpt.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty' holds no checkpoint: expected config\.json"):
        numgpt.load(tmp_path / "empty")
    (tmp_path / "other.json").write_text('{"format": "keras", "version": 1}')
    with pytest.raises(CheckpointError, match=r"other\.json: 'format' is 'keras'"):
        numgpt.load(tmp_path / "other.json")
    checkpoint.save(tiny_numgpt(), tmp_path / "ck")
    edit_json(tmp_path / "ck.json", version=99)
    with pytest.raises(CheckpointError, match=r"format version 99, this numgpt reads version 1"):
        numgpt.load(tmp_path / "ck")
    edit_json(tmp_path / "ck.json", version=1)
    (tmp_path / "ck.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing weights file '.*ck\.safetensors'"):
        numgpt.load(tmp_path / "ck")
    torch.save({"model": {}}, tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match="is a nanogpt checkpoint; load_checkpoint reads numgpt"):
        checkpoint.load_checkpoint(tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match="meta must be JSON-serialisable"):
        checkpoint.save(tiny_numgpt(), tmp_path / "x", meta={"bad": object()})


def test_missing_recorded_tokenizer_is_a_note_not_a_failure(tmp_path, custom_bpe_dir):
    """The checkpoint's own copy of its tokenizer files deleted: the weights still load, with a
    note. (Before, the checkpoint recorded the folder the files were read from, and deleting
    that folder did this; now a save copies them, see the fine-tuning test below.)"""
    import shutil

    model = tiny_numgpt()
    model.tokenizer = GPT2Tokenizer.from_folder(custom_bpe_dir)
    checkpoint.save(model, tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck.tokenizer")
    back = numgpt.load(tmp_path / "ck")
    assert back.tokenizer is None and "could not be loaded" in back.source["notes"][0]
    assert same_weights(model, back)


# ----------------------------------------------------------------- atomic writes

def _no_temp_files(folder: Path) -> bool:
    from numgpt.io.files import TEMP_SUFFIX

    return not [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = tiny_numgpt(seed=1)
    checkpoint.save(old, tmp_path / "ck", meta={"step": 1})
    new = tiny_numgpt(seed=2)

    def half_then_crash(tensors, path, metadata):  # the disk fills up mid-write
        path.write_bytes(b"\x00" * 1000)
        raise OSError("No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_save_safetensors", half_then_crash)
        with pytest.raises(OSError, match="No space"):
            checkpoint.save(new, tmp_path / "ck", meta={"step": 2})

    def json_crash(text):
        def write(path):
            path.write_text(text[:10])
            raise KeyboardInterrupt
        return write

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_write_text", json_crash)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(new, tmp_path / "ck", meta={"step": 2})
    back, meta, _ = checkpoint.load_checkpoint(tmp_path / "ck")
    assert same_weights(old, back) and meta == {"step": 1}
    assert _no_temp_files(tmp_path)
    checkpoint.save(new, tmp_path / "ck", meta={"step": 2})  # and a clean save replaces it
    assert same_weights(new, numgpt.load(tmp_path / "ck"))


def test_crash_between_the_two_renames_loads_the_new_complete_save(tmp_path, monkeypatch):
    """The weights file carries the checkpoint's document: renaming it is the commit, so a
    crash before the .json follows leaves the new save whole (the stale .json is ignored,
    then rewritten by the next run of the folder)."""
    from numgpt.io import recovery

    checkpoint.save(tiny_numgpt(seed=1), tmp_path / "ck", meta={"step": 1})
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the weights were renamed, before the JSON
        real_replace(src, dst)

    new = tiny_numgpt(seed=2)
    monkeypatch.setattr(checkpoint.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(new, tmp_path / "ck", meta={"step": 2})
    monkeypatch.undo()
    assert _no_temp_files(tmp_path)
    assert json.loads((tmp_path / "ck.json").read_text())["meta"] == {"step": 1}  # stale copy
    back, meta, _ = checkpoint.load_checkpoint(tmp_path / "ck")
    assert same_weights(new, back) and meta == {"step": 2}
    assert "from an earlier save" in back.source["notes"][0]
    notes = recovery.tidy_folder(tmp_path, ("ck",))
    assert len(notes) == 1 and "rewritten from ck.safetensors" in notes[0]
    assert json.loads((tmp_path / "ck.json").read_text())["meta"] == {"step": 2}
    assert recovery.tidy_folder(tmp_path, ("ck",)) == []  # nothing left to repair
    (tmp_path / "ck.json").unlink()  # a crash during the first save of a folder: no .json yet
    back, meta, _ = checkpoint.load_checkpoint(tmp_path / "ck")
    assert same_weights(new, back) and "ck.json is missing" in back.source["notes"][0]


def test_weights_without_their_document_and_a_json_from_another_save_are_detected_not_mixed(tmp_path):
    """A weights file with no document inside (written before numgpt stored one there) cannot
    say which file is newer: a pair whose save_ids differ is refused by name, never mixed."""
    checkpoint.save(tiny_numgpt(seed=1), tmp_path / "ck")
    weights = tmp_path / "ck.safetensors"
    save_file(load_file(str(weights)), str(weights),
              metadata={"format": "np", "numgpt": checkpoint.FORMAT_NAME, "save_id": "0" * 32})
    with pytest.raises(CheckpointError, match=r"ck\.safetensors \(save_id .*ck\.json \(save_id .*different saves"):
        numgpt.load(tmp_path / "ck")


def test_interrupted_export_leaves_the_previous_hf_folder_intact(tmp_path, monkeypatch):
    old = tiny_numgpt(seed=1)
    checkpoint.export_hf(old, tmp_path)
    monkeypatch.setattr(checkpoint, "_save_safetensors",
                        lambda t, p, m: (p.write_bytes(b"partial"), (_ for _ in ()).throw(OSError("I/O error"))))
    with pytest.raises(OSError, match="I/O error"):
        checkpoint.export_hf(tiny_numgpt(seed=2), tmp_path)
    monkeypatch.undo()
    assert same_weights(old, numgpt.load(tmp_path)) and _no_temp_files(tmp_path)


# -------------------------------------------------------------------------- CLI

def test_cli_convert_hf_to_numgpt_and_back_and_info(hf_folder, tmp_path, capsys):
    src = numgpt.load(hf_folder)
    assert main(["convert", str(hf_folder), str(tmp_path / "ck")]) == 0
    assert "wrote numgpt checkpoint" in capsys.readouterr().out
    assert same_weights(src, numgpt.load(tmp_path / "ck"))
    assert main(["convert", str(tmp_path / "ck.json"), str(tmp_path / "hf2") + "/"]) == 0
    assert "wrote Hugging Face folder" in capsys.readouterr().out
    assert same_weights(src, numgpt.load(tmp_path / "hf2"))
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--dtype", "float64"]) == 0
    capsys.readouterr()  # an existing folder means HF format
    assert numgpt.load(tmp_path / "hf2").wte.weight.data.dtype == np.float64

    assert main(["info", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "format      numgpt" in out and f"parameters  {src.num_parameters():,}" in out
    assert "dtype       float32" in out and "n_layer=2" in out and "tokenizer   none" in out
    assert main(["info", str(hf_folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["format"], d["parameters"], d["dtype"], d["tokenizer"]) == ("hf", src.num_parameters(), "float32", None)


def test_cli_convert_refuses_a_folder_as_numgpt_prefix_and_reports_errors(tmp_path, capsys):
    checkpoint.save(tiny_numgpt(), tmp_path / "ck")
    (tmp_path / "dir").mkdir()
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "dir"), "--format", "numgpt"]) == 2
    assert "is a folder; a numgpt checkpoint is a file prefix" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("numgpt: error: no checkpoint at") and "Traceback" not in err


def test_cli_tokenize_encodes_and_decodes_with_the_models_tokenizer(tmp_path, capsys, gpt2_tokenizer_dir, monkeypatch):
    model = tiny_numgpt()
    model.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    checkpoint.export_hf(model, tmp_path / "hf")
    checkpoint.save(model, tmp_path / "ck")
    for path in (tmp_path / "hf", tmp_path / "ck"):
        assert main(["tokenize", "--model", str(path), "Hello."]) == 0
        assert json.loads(capsys.readouterr().out) == [15496, 13]
    for given in (["[15496, 13]"], ["15496 13"], ["15496", "13"]):
        assert main(["tokenize", "--model", str(tmp_path / "hf"), "--decode", *given]) == 0
        assert capsys.readouterr().out == "Hello.\n"
    assert main(["tokenize", "--model", str(tmp_path / "ck"), "--allow-special", "a<|endoftext|>"]) == 0
    assert json.loads(capsys.readouterr().out) == [64, 50256]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello."))
    assert main(["tokenize", "--tokenizer", str(gpt2_tokenizer_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == [15496, 13]


def test_cli_tokenize_bytes_and_its_errors(tmp_path, capsys):
    assert main(["tokenize", "--tokenizer", "bytes", "hé"]) == 0
    assert json.loads(capsys.readouterr().out) == [104, 195, 169]
    assert main(["tokenize", "--tokenizer", "bytes", "--decode", "104,195,169"]) == 0
    assert capsys.readouterr().out == "hé\n"
    assert main(["tokenize", "--tokenizer", "bytes", "--decode", "104 x"]) == 2
    assert "token id 'x' is not an integer" in capsys.readouterr().err
    checkpoint.save(tiny_numgpt(), tmp_path / "ck")  # no tokenizer recorded
    assert main(["tokenize", "--model", str(tmp_path / "ck"), "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


# ------------------------------------------------------- sizes and finite weights

@pytest.mark.parametrize("bias", [True, False])
def test_parameter_shapes_and_count_match_the_allocated_model(bias):
    import math

    config = GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=4, bias=bias)
    model = GPT(config, seed=0)
    allocated = {n: tuple(p.data.shape) for n, p in model.parameters().items()}
    assert list(config.parameter_shapes().items()) == list(allocated.items())
    assert config.parameter_count() == model.num_parameters() == sum(map(math.prod, allocated.values()))
    assert config.parameter_bytes() == 4 * model.num_parameters()
    assert GPTConfig().parameter_count() == 124_439_808  # GPT-2 small, the published size


def test_absurd_config_is_refused_before_allocation_naming_both_sizes(tmp_path):
    """config.json claims vocab_size 10**9 (3.6 TiB of float32 parameters) over a tiny weights
    file: the file's keys and shapes, then the memory, are checked before anything is allocated."""
    checkpoint.export_hf(tiny_numgpt(), tmp_path)
    edit_json(tmp_path / "config.json", vocab_size=10**9)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'wte\.weight': expected \(1000000000, 32\)"):
        numgpt.load(tmp_path)
    config = GPTConfig(vocab_size=10**9, n_embd=768, n_head=12)
    C = 768  # embeddings (V + T) x C, 12 layers of 12 C^2 weights + 13 C gains and biases, ln_f
    params = (10**9 + 1024) * C + 12 * (12 * C * C + 13 * C) + 2 * C
    with pytest.raises(ConfigError, match=rf"needs {params * 4 / 2**40:,.1f} TiB for its parameters "
                                          rf"\({params:,} parameters x 4 bytes\) but this machine has "
                                          r"[\d,.]+ [GM]iB available"):
        checkpoint.check_memory(config, "the model")
    checkpoint.check_memory(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32),
                            "a tiny model")  # fits: no error


def test_non_finite_weights_are_refused_unless_the_check_is_skipped(tmp_path):
    for bad in (np.nan, np.inf):
        model = tiny_numgpt()
        model.h[1].mlp.c_fc.weight.data[0, :3] = bad
        checkpoint.save(model, tmp_path / "ck")
        with pytest.raises(CheckpointError, match=r"ck\.safetensors: parameter 'h\.1\.mlp\.c_fc\.weight' "
                                                  r"holds 3 NaN or infinite value\(s\).*--skip-finite-check"):
            numgpt.load(tmp_path / "ck")
        back = numgpt.load(tmp_path / "ck", check_finite=False)
        assert np.isnan(back.h[1].mlp.c_fc.weight.data[0, 0]) == np.isnan(bad)
    checkpoint.export_hf(model, tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: parameter .* NaN or infinite"):
        numgpt.load(tmp_path / "hf")


def test_a_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from numgpt.io.files import WriteError

    old = tiny_numgpt(seed=1)
    checkpoint.save(old, tmp_path / "ck", meta={"step": 1})

    def full(tensors, path, metadata):
        path.write_bytes(b"\x00" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_save_safetensors", full)
    with pytest.raises(WriteError, match=r"^disk full writing '.*ck\.safetensors' \(No space left on device\); "
                                         r"the previous checkpoint '.*ck', if any, is kept; free space") as e:
        checkpoint.save(tiny_numgpt(seed=2), tmp_path / "ck", meta={"step": 2})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    monkeypatch.undo()
    back, meta, _ = checkpoint.load_checkpoint(tmp_path / "ck")
    assert same_weights(old, back) and meta == {"step": 1} and _no_temp_files(tmp_path)


def test_tidy_folder_removes_only_the_temporaries_numgpt_leaves(tmp_path):
    """A crash leaves ``.NAME.<8 random>.tmp`` files (io.files.temp_path); the next run of the
    folder removes those, a planted symlink among them without following it, and nothing else."""
    from numgpt.io import recovery
    from numgpt.io.files import temp_path

    checkpoint.save(tiny_numgpt(), tmp_path / "latest")
    orphans = [temp_path(tmp_path / "latest.safetensors"), temp_path(tmp_path / "log.jsonl")]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / ".best.json.abcd1234.tmp")
    others = ["notes.tmp", ".hidden", "latest.json.bak", ".x.short.tmp"]  # not numgpt's pattern
    for name in others:
        (tmp_path / name).write_text("user file")
    notes = recovery.tidy_folder(tmp_path)
    assert len(notes) == 3 and all("left by an interrupted write" in n for n in notes)
    assert not any(p.exists() or p.is_symlink() for p in orphans)
    assert not (tmp_path / ".best.json.abcd1234.tmp").is_symlink() and victim.read_text() == "keep"
    assert all((tmp_path / name).read_text() == "user file" for name in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["latest.json", "latest.safetensors", "victim.txt", *others])


# ------------------------------------ fine-tuned checkpoints and run folders (issue 21)

FT_TEXT = "The quick brown fox jumps over the lazy dog. Hello. I'm a little late to the party.\n" * 30


def _finetune(tmp_path, tokenizer_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    """A few steps of `numgpt train --init` from a random-weight Hugging Face folder holding
    ``tokenizer_dir``'s BPE files; returns (base folder, run folder)."""
    from numgpt.io.data import prepare
    from numgpt.train.loop import train

    base = tmp_path / "base"
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16,
                          bias=True, activation="gelu_tanh"), seed=1)
    model.tokenizer = GPT2Tokenizer.from_folder(tokenizer_dir)
    checkpoint.export_hf(model, base)
    (tmp_path / "in.txt").write_text(FT_TEXT, encoding="utf-8")
    prepare([tmp_path / "in.txt"], GPT2Tokenizer.from_folder(base), tmp_path / "data", progress=False)
    train({"data": str(tmp_path / "data"), "out": str(tmp_path / "run"), "init": str(base),
           "max_iters": 3, "eval_interval": 0, "eval_iters": 1, "batch_size": 2, "block_size": 16,
           "warmup_iters": 1, "sample_tokens": 0, "plot": False, "workers": 1}, progress=False)
    return base, tmp_path / "run"


@pytest.mark.parametrize("kind", ["gpt2", "custom"])
def test_fine_tuned_run_survives_moving_it_and_deleting_its_base(tmp_path, gpt2_tokenizer_dir,
                                                                 custom_bpe_dir, kind, capsys):
    """Issue 21 group 4: best.json recorded the tokenizer as the base folder's absolute path
    and copied nothing, so this load had no tokenizer; and its train_config held the
    from-scratch defaults (n_layer 4, n_embd 128), not the model trained."""
    import shutil

    from numgpt.train.config import TrainConfig

    tok_dir, vocab = (gpt2_tokenizer_dir, 50257) if kind == "gpt2" else (custom_bpe_dir, 1257)
    reference = GPT2Tokenizer.from_folder(tok_dir)
    base, run = _finetune(tmp_path, tok_dir, vocab)
    moved = Path(shutil.move(str(run), str(tmp_path / "elsewhere" / "ft")))
    shutil.rmtree(base)
    shutil.rmtree(tmp_path / "data")
    doc = json.loads((moved / "best.json").read_text())
    if kind == "gpt2":  # by name: numgpt ships these files
        assert doc["tokenizer"] == {"type": "gpt2-bpe", "name": "gpt2"}
        assert not (moved / "best.tokenizer").exists()
    else:  # a copy beside the checkpoint, named relative to it
        assert doc["tokenizer"] == {"type": "gpt2-bpe", "path": "best.tokenizer"}
    model = numgpt.load(moved / "best")
    assert model.tokenizer is not None and model.tokenizer.vocab_size == vocab
    text = "Hello. I'm a little late"
    assert model.tokenizer.encode(text) == reference.encode(text)
    assert main(["generate", "--model", str(moved / "best"), "--prompt", "Hello.", "-n", "4",
                 "--temperature", "0", "--json", "--no-eot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == reference.encode("Hello.") and len(out["generated_ids"]) == 4
    # the stored config describes the model trained, not the defaults
    trained = doc["model"]
    saved = doc["meta"]["train_config"]
    keys = ("n_layer", "n_head", "n_embd", "bias", "activation")
    assert {k: saved[k] for k in keys} == {k: trained[k] for k in keys} == {
        "n_layer": 2, "n_head": 2, "n_embd": 16, "bias": True, "activation": "gelu_tanh"}
    defaults = TrainConfig()
    assert any(getattr(defaults, k) != trained[k] for k in keys)  # the old record would differ


def test_fine_tuned_run_resumes_with_the_recorded_model(tmp_path, gpt2_tokenizer_dir):
    """The model keys now recorded from the --init model do not stop --resume, nor do the
    from-scratch defaults that runs saved before this change recorded."""
    from numgpt.train.config import resume_config
    from numgpt.train.loop import train

    _, run = _finetune(tmp_path, gpt2_tokenizer_dir, 50257)
    result = train(resume_config(run, {"max_iters": 4}), progress=False)
    assert result.step == 4 and result.model.config.n_layer == 2
    latest = run / "latest.json"  # as an older numgpt wrote it: the defaults
    doc = json.loads(latest.read_text())
    doc["meta"]["train_config"].update(n_layer=4, n_head=4, n_embd=128, bias=False, activation="gelu")
    latest.write_text(json.dumps(doc))
    result = train(resume_config(run, {"max_iters": 5}), progress=False)
    assert result.step == 5 and result.model.config.n_layer == 2
    saved = json.loads(latest.read_text())["meta"]["train_config"]
    assert (saved["n_layer"], saved["n_embd"]) == (2, 16)  # recorded right from now on


def _run_folder(tmp_path) -> tuple[Path, GPT, GPT]:
    """What `numgpt train --out RUN` leaves: RUN/best.* and RUN/latest.* (different weights)."""
    run = tmp_path / "runs" / "mine"
    best, latest = tiny_numgpt(seed=1), tiny_numgpt(seed=2)
    for m in (best, latest):
        m.tokenizer = ByteTokenizer()
    checkpoint.save(best, run / "best")
    checkpoint.save(latest, run / "latest")
    return run, best, latest


def test_a_run_folder_means_its_best_checkpoint_then_latest(tmp_path, capsys):
    """Issue 21 group 5: `--model runs/mine` was refused ('holds no checkpoint')."""
    run, best, latest = _run_folder(tmp_path)
    assert same_weights(numgpt.load(run), best)
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(run / "best") and info["format"] == "numgpt"
    assert main(["tokenize", "--model", str(run), "hi"]) == 0
    assert json.loads(capsys.readouterr().out) == [104, 105]
    assert capsys.readouterr().err == ""  # best exists: nothing to say
    for suffix in (".json", ".safetensors"):
        (run / f"best{suffix}").unlink()
    assert same_weights(numgpt.load(run), latest)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no best checkpoint" in err and str(run / "latest") in err


def test_a_folder_that_is_no_checkpoint_names_what_was_looked_for(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("numgpt: error: folder") and err.count("\n") == 1
    for looked_for in ("config.json", "ckpt.pt", "best.json", "latest.json", "readme.txt"):
        assert looked_for in err
    with pytest.raises(CheckpointError, match="run folder"):
        numgpt.load(folder)


# ---------------------------------------------------- parameter counts and messages

def _with_tokenizer(tok) -> GPT:
    """A 1-layer random model whose vocabulary is its tokenizer's."""
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16),
                seed=0)
    model.tokenizer = tok
    return model


def test_every_parameter_count_of_a_q8_model_is_its_full_count(tmp_path, capsys, caplog):
    """Issue 21 group 12: `numgpt serve` logged only the float arrays of a q8_0 model (the
    LayerNorms, biases and wpe); info, the checkpoint and the server now report one count."""
    import logging

    from numgpt.core import quant
    from numgpt.serve.app import ServerConfig, _State

    float_model = tiny_numgpt()
    full = float_model.num_parameters()  # every weight is a float Parameter here
    q = quant.quantize_model(tiny_numgpt(), "q8_0")
    q.tokenizer = ByteTokenizer()
    assert q.num_parameters() < full  # what the old log line printed
    checkpoint.save(q, tmp_path / "q8")
    assert json.loads((tmp_path / "q8.json").read_text())["parameters"] == full
    assert main(["info", str(tmp_path / "q8"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == full
    state = _State(ServerConfig(model_path=str(tmp_path / "q8")))
    with caplog.at_level(logging.INFO, logger="numgpt.serve.app"):
        state._load()
    try:
        assert state.load_error is None
        line = next(r.getMessage() for r in caplog.records if "parameters" in r.getMessage())
        assert f"({full:,} parameters)" in line
    finally:
        state.stop()


def test_empty_prompt_advice_fits_the_models_tokenizer(tmp_path, capsys, gpt2_tokenizer_dir):
    """A byte model has no '<|endoftext|>' (the old advice for every model): it is told its
    newline id; a GPT-2 BPE model is still told 50256."""
    checkpoint.save(_with_tokenizer(ByteTokenizer()), tmp_path / "bytes")
    assert main(["generate", "--model", str(tmp_path / "bytes"), "--prompt", ""]) == 2
    gemm_line, err = capsys.readouterr().err.split("\n", 1)
    assert gemm_line.startswith("numgpt: GEMM library ")  # every computing command names it first
    assert "the prompt is empty" in err and "newline, id 10" in err
    assert "50256" not in err and err.count("\n") == 1
    checkpoint.save(_with_tokenizer(GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)), tmp_path / "bpe")
    assert main(["generate", "--model", str(tmp_path / "bpe"), "--prompt", ""]) == 2
    assert "'<|endoftext|>', id 50256" in capsys.readouterr().err


def test_hf_export_names_exactly_the_files_it_wrote(tmp_path, capsys, gpt2_tokenizer_dir):
    """A byte model's export said '+ tokenizer files' and wrote none."""
    import re

    for name, tok in (("bytes", ByteTokenizer()), ("bpe", GPT2Tokenizer.from_folder(gpt2_tokenizer_dir))):
        checkpoint.save(_with_tokenizer(tok), tmp_path / name)
        out = tmp_path / f"{name}_hf"
        assert main(["convert", str(tmp_path / name), str(out) + "/"]) == 0
        said = capsys.readouterr().out
        listed = re.search(r"Hugging Face folder \S+ \(([^)]*)\)", said).group(1).split(" + ")
        assert sorted(listed) == sorted(p.name for p in out.iterdir()), said
        if name == "bytes":
            assert "byte tokenizer has no vocabulary files" in said
            assert "vocab.json" not in listed and "tokenizer files" not in said
        else:
            assert {"vocab.json", "merges.txt"} <= set(listed)


# ------------------------------------------------- hostile files, the loaders' side (issue 20)

def test_numgpts_own_safetensors_writer_reads_back_through_the_library(tmp_path):
    """numgpt writes .safetensors itself (mode and temporaries are its own); the library's
    ``load_file``/``safe_open`` read every dtype and shape back, metadata included. A header
    whose byte ranges leave a gap is refused by the same library (its check is what guards us)."""
    from safetensors import safe_open

    path = tmp_path / "x.safetensors"
    path.touch()
    tensors = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f64_0d": np.array(3.5),
               "i8_empty": np.zeros((0, 4), np.int8), "bool": np.array([True, False]),
               "f16_strided": np.arange(10, dtype=np.float16)[::2], "big_endian": np.arange(4, dtype=">f4")}
    checkpoint._save_safetensors(tensors, path, {"k": "v"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, a in tensors.items():
        assert back[name].shape == a.shape and np.array_equal(back[name], a), name
    with safe_open(str(path), "numpy") as f:
        assert f.metadata() == {"k": "v"}
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    header["f32"]["data_offsets"] = [o + 8 for o in header["f32"]["data_offsets"]]  # a gap
    raw = json.dumps(header).encode()
    (tmp_path / "gap.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + path.read_bytes()[8 + n:] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint._open_safetensors(tmp_path / "gap.safetensors", __import__("contextlib").ExitStack())


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_tensor_count_is_the_number_of_parameter_shapes(bias):
    for n_layer in (1, 2, 7):
        c = GPTConfig(vocab_size=64, block_size=8, n_layer=n_layer, n_head=2, n_embd=32, bias=bias)
        assert c.parameter_tensor_count() == len(c.parameter_shapes())


def test_crafted_config_values_are_one_line_not_a_traceback(tmp_path):
    """An HF config.json whose architectures is 7 or whose activation is a list raised
    TypeError; a numgpt config with layer_norm_epsilon inf loaded (and computed NaN)."""
    from numgpt.io.recovery import DOC_KEY

    model = tiny_numgpt()
    checkpoint.export_hf(model, tmp_path / "hf")
    for key, value in (("architectures", 7), ("activation_function", ["gelu"])):
        raw = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / f"config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(CheckpointError, match=f"config.json: .*{key}") as e:
            numgpt.load(tmp_path / "hf")
        assert "\n" not in str(e.value)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    checkpoint.save(model, tmp_path / "ck")
    doc = json.loads((tmp_path / "ck.json").read_text())
    doc["model"]["layer_norm_epsilon"] = float("inf")
    (tmp_path / "ck.json").write_text(json.dumps(doc))
    weights = tmp_path / "ck.safetensors"
    save_file(load_file(str(weights)), str(weights),
              metadata={**checkpoint._header(weights)[0]["__metadata__"], DOC_KEY: json.dumps(doc)})
    with pytest.raises(CheckpointError, match="layer_norm_epsilon' must be finite and > 0, got inf"):
        numgpt.load(tmp_path / "ck")


def _rewrite_doc(prefix: Path, edit) -> None:
    """Edit a numgpt checkpoint's document in both places it lives (.json and the header)."""
    from numgpt.io.recovery import DOC_KEY

    doc = json.loads(prefix.with_suffix(".json").read_text())
    edit(doc)
    prefix.with_suffix(".json").write_text(json.dumps(doc))
    weights = prefix.with_suffix(".safetensors")
    save_file(load_file(str(weights)), str(weights),
              metadata={**checkpoint._header(weights)[0]["__metadata__"], DOC_KEY: json.dumps(doc)})


def test_a_quantized_checkpoint_is_checked_against_its_config_before_memory(tmp_path):
    """block_size 2**40 in a q8_0 checkpoint's config: the old order checked memory first
    ("needs 128.0 TiB") and never said which tensor disagreed."""
    from numgpt.core import quant

    prefix = checkpoint.save(quant.quantize_model(tiny_numgpt()), tmp_path / "q")
    _rewrite_doc(prefix, lambda d: d["model"].update(block_size=2**40))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'wpe\.weight': expected "
                                              r"\(1099511627776, 32\).*found \(32, 32\)"):
        numgpt.load(prefix)
    prefix = checkpoint.save(quant.quantize_model(tiny_numgpt()), tmp_path / "q2")
    tensors = load_file(str(tmp_path / "q2.safetensors"))
    tensors["h.0.mlp.c_fc.weight.scales"] = tensors["h.0.mlp.c_fc.weight.scales"].astype(np.float32)
    save_file(tensors, str(tmp_path / "q2.safetensors"),
              metadata=checkpoint._header(tmp_path / "q2.safetensors")[0]["__metadata__"])
    with pytest.raises(CheckpointError, match=r"'h\.0\.mlp\.c_fc\.weight\.scales' is stored as "
                                              r"float32, expected float16"):
        numgpt.load(prefix)


def test_a_shard_missing_a_tensor_its_index_names_is_one_line(hf_folder):
    tensors = load_file(str(hf_folder / "model.safetensors"))
    (hf_folder / "model.safetensors").unlink()
    save_file(tensors, str(hf_folder / "shard.safetensors"))
    index = {"weight_map": {**{k: "shard.safetensors" for k in tensors}, "transformer.h.9.ln_1.weight":
                            "shard.safetensors"}}
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard\.safetensors: holds no tensor "
                                              r"'transformer\.h\.9\.ln_1\.weight'"):
        numgpt.load(hf_folder)
