"""GGUF (numgpt/io/gguf.py): llama.cpp's GPT-2 layout written and read through the ``gguf``
package.

Round trips: f32 bit for bit, f16 to float16 precision, q8_0 to the stored blocks (a
quantized model's blocks verbatim). The file read back by gguf's own GGUFReader has
llama.cpp's keys, tensor names and (out, in) shapes; q8_0 bytes decode with gguf's own
``quants.dequantize`` to the values numgpt computes with. A file written the way llama.cpp's
``convert_hf_to_gguf.py`` writes GPT-2 (HF names mapped, Conv1D weights transposed, an
``output.weight`` copy of the embedding, gguf's own q8_0 quantizer) loads with the logits
of the Hugging Face model it came from.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import numgpt  # noqa: E402
from numgpt.core import quant  # noqa: E402
from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.core.tensor import no_grad  # noqa: E402
from numgpt.errors import CheckpointError, ConfigError  # noqa: E402
from numgpt.io.checkpoint import load as load_gguf  # noqa: E402  (GGUF by its .gguf name)
from numgpt.io.gguf import INERT_MERGE, tensor_names, write_gguf  # noqa: E402
from numgpt.io.tokenizer import ByteTokenizer, GPT2Tokenizer, bytes_to_unicode  # noqa: E402

TINY = dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)
IDS = np.array([[5, 17, 200, 3, 99, 42, 7]])
Q8 = gguf.GGMLQuantizationType.Q8_0


def _model(seed=1, **overrides) -> GPT:
    m = GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in m.parameters().items():  # non-trivial norms and biases too
        if p.data.ndim == 1:
            p.data[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.1, p.data.shape)
    m.tokenizer = ByteTokenizer()
    return m


def _logits(model, ids=IDS) -> np.ndarray:
    with no_grad():
        return model(ids)[0].data


def _fields(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    keys = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(s) for s in t.shape]) for t in r.tensors}
    return keys, tensors


# ------------------------------------------------------------------------ round trips

def test_f32_round_trips_bit_for_bit_with_the_same_logits(tmp_path):
    m = _model()
    back = numgpt.load(write_gguf(m, tmp_path / "m.gguf", "f32"))
    assert back.source["format"] == "gguf" and not quant.is_quantized(back)
    for name, p in m.parameters().items():
        assert np.array_equal(back.parameters()[name].data, p.data), name
    assert np.array_equal(_logits(back), _logits(m))
    assert isinstance(back.tokenizer, ByteTokenizer)


def test_f16_round_trips_to_float16_precision(tmp_path):
    m = _model()
    back = load_gguf(write_gguf(m, tmp_path / "m.gguf", "f16"))
    for name, p in m.parameters().items():
        want = p.data.astype(np.float16).astype(np.float32) if p.data.ndim == 2 else p.data
        assert np.array_equal(back.parameters()[name].data, want), name


def test_q8_0_from_a_float_model_stores_numgpts_blocks(tmp_path):
    m = _model()
    back = load_gguf(write_gguf(m, tmp_path / "m.gguf", "q8_0"))
    assert quant.scheme_of(back) == "q8_0"
    want = quant.quantize_q8_0(m.h[1].mlp.c_fc.weight.data.T)
    got = back.h[1].mlp.c_fc.weight
    assert np.array_equal(got.qs, want.qs) and np.array_equal(got.scales, want.scales)
    assert np.array_equal(back.wpe.weight.data, m.wpe.weight.data)  # wpe stays float32


def test_q8_0_of_a_quantized_model_round_trips_its_blocks_verbatim(tmp_path):
    q = quant.quantize_model(_model())
    back = load_gguf(write_gguf(q, tmp_path / "q.gguf", "q8_0"))
    for (_, a), (_, b) in zip(sorted(_matrices(q).items()), sorted(_matrices(back).items())):
        assert np.array_equal(a.qs, b.qs) and np.array_equal(a.scales, b.scales)
    assert np.array_equal(_logits(back), _logits(q))


def _matrices(model) -> dict:
    out = {"wte": model.wte.weight}
    for i, b in enumerate(model.h):
        out.update({f"{i}.qkv": b.attn.c_attn.weight, f"{i}.o": b.attn.c_proj.weight,
                    f"{i}.up": b.mlp.c_fc.weight, f"{i}.down": b.mlp.c_proj.weight})
    return out


def test_q8_0_bytes_decode_with_ggufs_own_dequantizer(tmp_path):
    q = quant.quantize_model(_model())
    path = write_gguf(q, tmp_path / "q.gguf", "q8_0")
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    theirs = gguf.quants.dequantize(np.asarray(t.data), Q8)  # (out, in) float32
    assert np.array_equal(theirs, q.h[0].mlp.c_proj.weight.dequantize(np.float32))


def test_erf_gelu_and_bias_free_models_round_trip_through_numgpt_keys(tmp_path):
    m = _model(activation="gelu", bias=False)
    back = load_gguf(write_gguf(m, tmp_path / "m.gguf", "f32"))
    assert back.config.activation == "gelu" and back.config.bias is False
    assert np.array_equal(_logits(back), _logits(m))
    _, tensors = _fields(tmp_path / "m.gguf")
    assert "blk.0.attn_qkv.bias" in tensors  # zero biases: llama.cpp requires them


# ------------------------------------------------------------- what gguf's reader sees

def test_gguf_reader_sees_llama_cpp_gpt2_keys_and_shapes(tmp_path, gpt2_tokenizer_dir):
    m = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=64), seed=0)
    m.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    keys, tensors = _fields(write_gguf(m, tmp_path / "m.gguf", "q8_0"))
    assert keys["general.architecture"] == "gpt2"
    assert {k: keys[k] for k in ("gpt2.context_length", "gpt2.embedding_length",
                                 "gpt2.feed_forward_length", "gpt2.block_count",
                                 "gpt2.attention.head_count")} == {
        "gpt2.context_length": 32, "gpt2.embedding_length": 64, "gpt2.feed_forward_length": 256,
        "gpt2.block_count": 2, "gpt2.attention.head_count": 4}
    assert keys["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert keys["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert keys["tokenizer.ggml.model"] == "gpt2"
    tokens, merges = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.merges"]
    assert len(tokens) == 50257 and tokens[15496] == "Hello" and tokens[50256] == "<|endoftext|>"
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert keys["tokenizer.ggml.token_type"][50256] == 3 and keys["tokenizer.ggml.token_type"][0] == 1
    assert keys["tokenizer.ggml.bos_token_id"] == keys["tokenizer.ggml.eos_token_id"] == 50256
    # ggml shapes are (ne0 = in, ne1 = out): numpy (out, in)
    assert tensors["token_embd.weight"] == ("Q8_0", [64, 50257])
    assert tensors["position_embd.weight"] == ("F32", [64, 32])
    assert tensors["blk.1.attn_qkv.weight"] == ("Q8_0", [64, 192])
    assert tensors["blk.1.attn_output.weight"] == ("Q8_0", [64, 64])
    assert tensors["blk.1.ffn_up.weight"] == ("Q8_0", [64, 256])
    assert tensors["blk.1.ffn_down.weight"] == ("Q8_0", [256, 64])
    assert tensors["blk.1.ffn_up.bias"] == ("F32", [256])
    assert tensors["output_norm.bias"] == ("F32", [64])
    assert set(tensors) == set(tensor_names(2).values())  # no output.weight: tied
    back = load_gguf(tmp_path / "m.gguf")
    text = "Hello. I'm a little late to the party"
    assert back.tokenizer.encode(text) == m.tokenizer.encode(text)


def test_a_byte_level_model_holds_256_byte_tokens_and_one_inert_merge(tmp_path):
    keys, _ = _fields(write_gguf(_model(), tmp_path / "b.gguf", "f32"))
    table = bytes_to_unicode()
    assert keys["tokenizer.ggml.model"] == "gpt2"
    assert keys["tokenizer.ggml.tokens"] == [table[b] for b in range(256)]
    assert keys["tokenizer.ggml.merges"] == [INERT_MERGE]
    assert all(len(part) == 2 for part in INERT_MERGE.split(" "))  # never a pair of bytes
    assert "tokenizer.ggml.eos_token_id" not in keys


# ------------------------------------------------------- files from llama.cpp's converter

def _converter_style_gguf(hf, path, qtype):
    """What convert_hf_to_gguf.py's GPT2Model writes: HF Conv1D weights transposed to
    (out, in), names mapped, ``output.weight`` = the embedding, 2-D weights in ``qtype``
    (gguf's own quantizer), norms, biases and position_embd in F32, no numgpt.* keys."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch="gpt2")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    hf_names = {v: k for k, v in tensor_names(c.n_layer).items()}  # gguf -> numgpt (== HF minus prefix)
    state = {k.removeprefix("transformer."): v.detach().numpy() for k, v in hf.state_dict().items()}
    for gguf_name, name in [*hf_names.items(), ("output.weight", "wte.weight")]:
        a = state["wte.weight" if gguf_name == "output.weight" else name].astype(np.float32)
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            a = a.T  # Conv1D (in, out) -> (out, in)
        a = np.ascontiguousarray(a)
        if qtype == Q8 and a.ndim == 2 and gguf_name != "position_embd.weight":
            w.add_tensor(gguf_name, gguf.quants.quantize(a, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(gguf_name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_converter_style_f32_file_gives_the_hugging_face_logits(tmp_path, hf_model):
    import torch

    model = load_gguf(_converter_style_gguf(hf_model, tmp_path / "c.gguf", gguf.GGMLQuantizationType.F32))
    with torch.no_grad():
        want = hf_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(_logits(model), want, rtol=1e-4, atol=1e-4)
    assert model.tokenizer is None and model.source["notes"]


def test_a_converter_style_q8_0_file_stays_quantized_with_gguf_dequantized_values(tmp_path, hf_model):
    path = _converter_style_gguf(hf_model, tmp_path / "c8.gguf", Q8)
    model = load_gguf(path)
    assert quant.scheme_of(model) == "q8_0"
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.1.attn_qkv.weight")
    assert np.array_equal(model.h[1].attn.c_attn.weight.dequantize(np.float32),
                          gguf.quants.dequantize(np.asarray(t.data), Q8))
    # logits: the quantized model against a float model holding the same dequantized values
    ref = GPT(model.config, seed=None)
    for name, p in model.parameters().items():
        ref.parameters()[name].data[...] = p.data
    ref.wte.weight.data[...] = model.wte.weight.dequantize(np.float32)
    for i, b in enumerate(model.h):
        for path_ in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            o, a = path_.split(".")
            getattr(getattr(ref.h[i], o), a).weight.data[...] = getattr(getattr(b, o), a).weight.dequantize(np.float32).T
    np.testing.assert_allclose(_logits(model), _logits(ref), rtol=1e-4, atol=1e-5)


def test_an_untied_output_weight_is_refused(tmp_path, hf_model):
    import copy

    import torch

    hf = copy.deepcopy(hf_model)
    hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    path = tmp_path / "u.gguf"
    _converter_style_gguf(hf, path, gguf.GGMLQuantizationType.F32)
    # rewrite output.weight as something else: a file whose head is not the embedding
    r = gguf.GGUFReader(str(path), "r+")
    next(t for t in r.tensors if t.name == "output.weight").data[0, 0] += 1.0
    del r
    with pytest.raises(CheckpointError, match="output.weight"):
        load_gguf(path)


# --------------------------------------------------------------------------- refusals

def test_other_architectures_and_tensor_types_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        numgpt.load(tmp_path / "llama.gguf")
    path = write_gguf(_model(), tmp_path / "m.gguf", "f32")
    q4 = tmp_path / "q4.gguf"
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(q4), arch="gpt2")
    for k, f in r.fields.items():
        if not k.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        a = np.asarray(t.data)
        if t.name == "blk.0.ffn_up.weight":
            w.add_tensor(t.name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="Q4_0"):
        load_gguf(q4)
    with pytest.raises(ConfigError, match="GGUF dtype"):
        write_gguf(_model(), tmp_path / "x.gguf", "q4_0")


# ------------------------------------------------------------ from GGUF to other formats

def test_cli_converts_a_bpe_gguf_to_numgpt_and_hf_keeping_the_tokenizer(tmp_path, gpt2_tokenizer_dir):
    """A GGUF's tokenizer has no files: convert writes them beside the numgpt checkpoint; a
    quantized model goes to a Hugging Face folder as the float32 values its blocks hold."""
    from numgpt import cli

    m = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=64), seed=0)
    m.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    src = write_gguf(m, tmp_path / "m.gguf", "q8_0")
    assert cli.main(["convert", str(src), str(tmp_path / "ck")]) == 0
    back = numgpt.load(tmp_path / "ck")
    assert quant.scheme_of(back) == "q8_0" and back.tokenizer.encode("Hello.") == [15496, 13]
    assert cli.main(["convert", str(src), str(tmp_path / "hf") + "/"]) == 0
    hf = numgpt.load(tmp_path / "hf")
    assert not quant.is_quantized(hf)
    ids = np.array([[15496, 13, 50256, 7]])
    np.testing.assert_allclose(_logits(hf, ids), _logits(back, ids), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- the bounded reader (issue 20)

def test_the_bounded_reader_reads_what_ggufs_own_reader_reads(tmp_path, gpt2_tokenizer_dir):
    """numgpt reads GGUF headers with its own bounded parser: on a real GPT-2 BPE file (50257
    tokens, 50000 merges) every key and tensor info equals gguf's GGUFReader's."""
    from numgpt.io.gguf import _read_header

    m = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=64), seed=0)
    m.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    for dtype in ("f32", "q8_0"):
        path = write_gguf(m, tmp_path / f"m-{dtype}.gguf", dtype)
        ours, theirs = _read_header(path), gguf.GGUFReader(str(path))
        want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        got = {k: (list(v[1]) if t == 9 else v) for k, (t, v) in ours.fields.items()}
        assert got.keys() == want.keys()
        for key, value in want.items():
            mine = got[key]
            if isinstance(value, list):  # numpy scalars from an array -> Python values
                mine = [x.item() if isinstance(x, np.generic) else x for x in mine]
            assert mine == (pytest.approx(value) if isinstance(value, float) else value), key
        for t in theirs.tensors:
            mine = ours.tensors[t.name]
            assert (mine.shape, mine.kind, mine.offset, mine.n_bytes) == (
                tuple(int(s) for s in reversed(t.shape)), t.tensor_type.name, int(t.data_offset),
                int(t.n_bytes)), t.name
            assert np.array_equal(mine().view(np.uint8).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_a_truncated_gguf_is_one_line_at_every_length(tmp_path):
    """Every prefix of a valid file (one length per region: header, keys, tensor infos, data)
    is refused in one CheckpointError line; none loads and none raises anything else."""
    path = write_gguf(_model(), tmp_path / "m.gguf", "f32")
    raw = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in sorted({0, 3, 4, 7, 20, 23, 40, 100, 500, 1000, 3000, len(raw) // 2, len(raw) - 1}):
        cut.write_bytes(raw[:n])
        with pytest.raises(CheckpointError) as e:
            load_gguf(cut)
        assert "\n" not in str(e.value) and "cut.gguf" in str(e.value), n


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gguf_loads_go_through_the_memory_check_every_format_has(dtype, tmp_path, monkeypatch):
    """GGUF used to allocate with no memory check; it now goes through io.checkpoint's."""
    from numgpt.io import checkpoint

    path = write_gguf(_model(), tmp_path / "m.gguf", dtype)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)  # bytes
    with pytest.raises(CheckpointError, match=r"m\.gguf needs .* but this machine has 0\.0 MiB available"):
        load_gguf(path)
    monkeypatch.undo()
    assert load_gguf(path).config.n_layer == 2
