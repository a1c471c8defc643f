"""Conversation data and masked training (issue 23.3): ``numgpt prepare --chat`` renders each
conversation with the chat template and writes a loss mask beside the token files; batches
turn unmasked targets into ignore_index; training's loss is the cross-entropy over the
assistant tokens only; bad lines are one error naming the line and the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from numgpt.cli import main
from numgpt.core.tensor import no_grad
from numgpt.errors import InputError
from numgpt.io import chat, data
from numgpt.io.tokenizer import ByteTokenizer

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "user", "content": "7*6?"}, {"role": "assistant", "content": "42"}],
]


def _write_jsonl(path, conversations, blank_lines=False):
    lines = [json.dumps({"messages": m}) for m in conversations]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


def test_prepare_chat_masks_exactly_the_assistant_replies(tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS, blank_lines=True)
    meta = data.prepare_chat(src, ByteTokenizer(), tmp_path / "d", val_fraction=0.25)
    assert meta["chat"]["template"] == chat.DEFAULT_TEMPLATE
    assert [meta["splits"][s]["conversations"] for s in data.SPLITS] == [3, 1]
    ds = data.TokenDataset(tmp_path / "d")
    train, mask = np.asarray(ds.train), np.asarray(ds.masks["train"])
    texts = [chat.render(None, m, ByteTokenizer()) for m in CONVERSATIONS]
    assert bytes(train.astype(np.uint8)).decode() == "".join(texts[:3])  # in order, whole
    assert bytes(np.asarray(ds.val, np.uint8)).decode() == texts[3]  # val: the last conversation
    carried = bytes(train[mask == 1].astype(np.uint8)).decode()
    assert carried == "5\x04Paris\x04Rome\x04hello there\x04"
    starts = np.cumsum([0] + [len(t) for t in texts[:2]])
    assert not mask[starts].any()  # no target at the start of a conversation
    assert meta["splits"]["train"]["assistant_tokens"] == len(carried)
    assert bytes(np.asarray(ds.val)[np.asarray(ds.masks["val"]) == 1].astype(np.uint8)) == b"42\x04"


def test_masked_batches_ignore_every_target_outside_the_replies(tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS * 3)
    data.prepare_chat(src, ByteTokenizer(), tmp_path / "d", val_fraction=0.0)
    ds = data.TokenDataset(tmp_path / "d")
    x, y = ds.get_batch("train", 16, 12, np.random.default_rng(0))
    x0, y0 = data.get_batch(ds.train, 16, 12, np.random.default_rng(0))  # no mask
    assert np.array_equal(x, x0)  # the same windows either way
    kept = y != data.IGNORE_INDEX
    assert kept.any() and (~kept).any()
    assert np.array_equal(y[kept], y0[kept])
    # every kept target is an assistant token; every ignored one is not
    mask = np.asarray(ds.masks["train"])
    ix = np.random.default_rng(0).integers(0, len(ds.train) - 12, size=16)
    positions = ix[:, None] + np.arange(1, 13)  # where each target sits in the split
    assert np.array_equal(kept, mask[positions] == 1)


def test_training_loss_is_cross_entropy_over_assistant_tokens_only(tmp_path):
    """The batch the trainer builds gives the model's loss over the masked targets only:
    checked against a hand-written log-softmax over exactly those positions, on the
    reference path and the fast path. The same batch without the mask scores differently."""
    from numgpt.core.model import GPT, GPTConfig

    src = _write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS * 3)
    data.prepare_chat(src, ByteTokenizer(), tmp_path / "d", val_fraction=0.0)
    ds = data.TokenDataset(tmp_path / "d")
    x, y = ds.get_batch("train", 8, 16, np.random.default_rng(1))
    _, y_all = data.get_batch(ds.train, 8, 16, np.random.default_rng(1))
    for kernels in ("reference", "fast"):
        model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16,
                              dtype="float64", kernels=kernels), seed=3)
        with no_grad():
            logits, loss = model(x, y)
            _, loss_all = model(x, y_all)
        z = logits.data - logits.data.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        kept = np.argwhere(y != -1)
        want = -np.mean([logp[b, t, y[b, t]] for b, t in kept])
        assert abs(loss.item() - want) < 1e-10, kernels
        assert abs(loss.item() - loss_all.item()) > 1e-3  # negative control: the mask matters


def test_train_on_chat_data_learns_and_checkpoints_carry_the_template(tmp_path, monkeypatch):
    """numgpt.train on prepare_chat output: every batch it trains and evaluates on has its
    targets outside the replies ignored, the loss falls, and best/latest carry the template."""
    import numgpt
    from numgpt.train import loop
    from numgpt.train.config import TrainConfig

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    src = _write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS * 8)
    data.prepare_chat(src, ByteTokenizer(), tmp_path / "d", val_fraction=0.25, template=template)
    cfg = TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "run"), n_layer=1, n_head=2,
                      n_embd=32, block_size=32, batch_size=8, max_iters=30, eval_interval=15,
                      eval_iters=2, learning_rate=3e-3, warmup_iters=0, seed=0, plot=False,
                      sample_tokens=0)
    seen = []

    def recording_get_batch(*args):
        x, y = data.get_batch(*args)
        if len(args) > 4 and args[4] is not None:  # the plot's per-position losses read all
            seen.append(float((y == data.IGNORE_INDEX).mean()))
        return x, y

    monkeypatch.setattr(loop, "get_batch", recording_get_batch)
    result = loop.train(cfg, progress=False)
    assert len(seen) >= 30 + 3 * 2 * 2 and min(seen) > 0.3  # 30 steps, 3 evals x 2 splits x 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("kind") == "eval"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    model = numgpt.load(tmp_path / "run")
    assert model.chat_template == template
    assert result is not None


@pytest.mark.parametrize("lines, match", [
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant" "content": "b"}]}'],
     r"c\.jsonl line 2 is not valid JSON"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      "", '{"prompt": "a", "completion": "b"}'],
     r"c\.jsonl line 3: no 'messages' field"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}'],
     r"c\.jsonl line 1: messages\[1\]\.role must be one of system, user, assistant"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}'],
     r"c\.jsonl line 1: messages\[1\]\.content must be a string, got int"),
    (['{"messages": [{"role": "user", "content": "a"}]}'],
     r"c\.jsonl line 1: messages has no assistant message"),
    (['{"messages": []}'], r"c\.jsonl line 1: messages must be a non-empty list"),
])
def test_bad_lines_are_one_error_naming_the_line_and_the_field(tmp_path, lines, match):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=match) as e:
        data.prepare_chat(src, ByteTokenizer(), tmp_path / "d")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "d" / "meta.json").exists()  # nothing half written


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes(b'{"messages": [{"role": "user", "content": "a"}, '
                    b'{"role": "assistant", "content": "b"}]}\n{"messages": "\xff"}\n')
    with pytest.raises(InputError, match=r"line 2 is not valid UTF-8"):
        data.prepare_chat(src, ByteTokenizer(), tmp_path / "d")


def test_openai_weight_zero_replies_carry_no_loss(tmp_path):
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "skip", "weight": 0},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "keep"}]
    ids, mask = chat.encode_conversation(None, conv, ByteTokenizer())
    assert bytes(i for i, m in zip(ids, mask) if m) == b"keep\x04"


def test_a_mask_file_of_the_wrong_size_is_refused(tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    data.prepare_chat(src, ByteTokenizer(), tmp_path / "d", val_fraction=0.25)
    with open(tmp_path / "d" / "train_mask.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(InputError, match=r"train_mask\.bin' has .* bytes but meta\.json says"):
        data.TokenDataset(tmp_path / "d")


def test_prepare_chat_command(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}",
                                      encoding="utf-8")
    assert main(["prepare", "--chat", str(src), "--out", str(tmp_path / "d"),
                 "--val-fraction", "0.25", "--chat-template", str(tmp_path / "t.jinja")]) == 0
    out = capsys.readouterr().out
    assert "train 3 conversations" in out and "val 1" in out
    meta = data.read_meta(tmp_path / "d")
    assert meta["chat"]["template"].startswith("{% for m in messages %}")
    assert bytes(np.asarray(data.load_split(tmp_path / "d", "val"), np.uint8)) == b"7*6?|42|"
    with pytest.raises(SystemExit):  # --input and --chat exclude each other
        main(["prepare", "--chat", str(src), "--input", str(src), "--out", str(tmp_path / "e")])


def _masked_step(workers: int, patch=None):
    """One float64 step on two masked micro-batches of 5 rows whose rows hold very different
    numbers of counted targets; returns (loss, weights)."""
    import numgpt.train.loop as training
    import numgpt.train.parallel as parallel_module
    from numgpt.core.model import GPT, GPTConfig
    from numgpt.train.optim import AdamW

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16,
                          dtype="float64"), seed=3)
    opt = AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(4)
    batches = []
    for _ in range(2):
        x, y = rng.integers(0, 50, (5, 8)), rng.integers(0, 50, (5, 8))
        y[:3, 1:] = -1  # rows 0-2 count one target each, rows 3-4 all eight
        batches.append((x, y))
    parallel = training.DataParallel(workers)
    mp = pytest.MonkeyPatch()
    if patch is not None:
        mp.setattr(parallel_module, "_counted", patch)
    try:
        stats = training.train_step(model, opt, batches, lr=1e-2, grad_clip=0.0, parallel=parallel)
    finally:
        mp.undo()
        parallel.close()
    return stats.loss, {n: p.data.copy() for n, p in model.parameters().items()}


def test_data_parallel_workers_weight_masked_slices_by_their_counted_targets():
    serial_loss, a = _masked_step(1)
    par_loss, b = _masked_step(2)
    assert par_loss == pytest.approx(serial_loss, abs=1e-12)
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) < 1e-12
    # negative control: weighting by rows (the rule before masks) gives another step
    rows_loss, c = _masked_step(2, patch=lambda y: len(y) * 8)
    assert abs(rows_loss - serial_loss) > 1e-3
