"""Evaluation (rung 7 of the verification ladder): strided perplexity and LAMBADA scoring
equal the reference course's evaluation harness, transcribed as an oracle and run with
``transformers`` on the same random-weight model and text.

The perplexity oracle is the course's loop (``begin = 0, prev_end = 0``; ``end = min(begin +
block_size, N - 1)``; read ``ids[begin:end]``, predict ``ids[begin+1:end+1]``; sum the last
``end - prev_end`` per-token losses; stop at ``end == N - 1``, else ``begin += stride``),
written in torch, with the loss taken in float64 from the logits (transformers' own
``labels=`` loss casts logits to float32, which would cap agreement near 1e-7). The LAMBADA
oracle splits with ``rsplit(" ", 1)``, encodes context and ``" " + word`` separately and
scores each example in torch. Both models are float64: the course gate is 1e-12 relative
(``COURSE_TOL``); the general gate of the other comparisons is 1e-6. Results go to
``docs/results/eval_parity.md``. Negative controls: the Hugging Face guide's alignment (what
numgpt used before: each window reads ``L`` tokens and predicts ``L - 1``), scoring
overlapping tokens twice, and scoring the LAMBADA target without its leading space, must all
miss the oracle by more than the tolerance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numgpt  # noqa: E402
from numgpt.cli import main  # noqa: E402
from numgpt.errors import InputError  # noqa: E402
from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.infer.evaluate import (lambada, load_lambada_jsonl, perplexity, split_last_word,  # noqa: E402
                             token_nll, windows)
from numgpt.io.tokenizer import ByteTokenizer, GPT2Tokenizer  # noqa: E402

import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir() / "eval_parity.md"  # docs/results/ under --write-results
REL_TOL = 1e-6
COURSE_TOL = 1e-12  # the course-protocol gate, float64 against float64
BLOCK = 64


def record(name: str, ours: dict, ref: dict, tol: float = REL_TOL) -> None:
    """Set one comparison row of the results table (merged with the rows already there)."""
    cells = []
    for key in ("tokens", "nll", "perplexity", "word_perplexity", "accuracy"):
        if key in ref:
            rel = abs(ours[key] - ref[key]) / max(abs(ref[key]), 1e-300)
            cells.append(f"{key} {ours[key]:.10g} vs {ref[key]:.10g} (rel {rel:.1e})")
    ok = all(abs(ours[k] - ref[k]) <= tol * abs(ref[k]) for k in ref)
    verdict = ("PASSED: check is blind" if ok else "FAIL as required") if name.startswith("control") \
        else ("PASS" if ok else "FAIL")
    results_table.record(RESULTS.name, name, "; ".join(cells), f"{tol:g}", verdict)


def assert_close(ours: dict, ref: dict, tol: float = REL_TOL) -> None:
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, rel=tol, abs=0), key


# ------------------------------------------------------------------------ references


def _window_nll(hf, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position float64 NLL of ``y`` given ``x`` (same length): the model reads x."""
    with torch.no_grad():
        logits = hf(x[None]).logits[0]  # (T, V) float64
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def ref_perplexity(hf, ids: list[int], stride: int, count_overlap_twice: bool = False) -> dict:
    """The course's loop, transcribed. ``count_overlap_twice`` is a negative control: every
    window scores all its targets."""
    L, N = hf.config.n_positions, len(ids)
    x = torch.tensor(ids)
    nll_sum, n_tokens, begin, prev_end = 0.0, 0, 0, 0
    while True:
        end = min(begin + L, N - 1)
        losses = _window_nll(hf, x[begin:end], x[begin + 1:end + 1])
        trg_len = end - begin if count_overlap_twice else end - prev_end
        nll_sum += float(losses[-trg_len:].sum())
        n_tokens += trg_len
        prev_end = end
        if end == N - 1:
            break
        begin += stride
    return {"tokens": n_tokens, "nll": nll_sum / n_tokens, "perplexity": math.exp(nll_sum / n_tokens)}


def ref_perplexity_hf_guide(hf, ids: list[int], stride: int) -> dict:
    """The Hugging Face guide's alignment, numgpt's protocol before it adopted the course's:
    windows ``[begin, min(begin + L, N))`` read ``L`` tokens and predict ``L - 1``; each scores
    the tokens past the previous window's end. A negative control for the course oracle."""
    L, N = hf.config.n_positions, len(ids)
    x = torch.tensor(ids)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, N, stride):
        end = min(begin + L, N)
        losses = _window_nll(hf, x[begin:end - 1], x[begin + 1:end])
        trg_len = min(end - prev_end, end - begin - 1)
        nll_sum += float(losses[-trg_len:].sum())
        n_tokens += trg_len
        prev_end = end
        if end == N:
            break
    return {"tokens": n_tokens, "nll": nll_sum / n_tokens, "perplexity": math.exp(nll_sum / n_tokens)}


def ref_lambada(hf, texts: list[str], encode, leading_space: bool = True) -> dict:
    """The course's LAMBADA loop: split at the last space, encode context and " " + word
    separately, score the target tokens with torch, count all-argmax examples; per-word
    perplexity as lm-evaluation-harness reports it (exp of the mean per-example NLL)."""
    L = hf.config.n_positions
    nlls, correct, per_example = [], 0, []
    for text in texts:
        context, word = text.rstrip().rsplit(" ", 1)
        ctx, tgt = encode(context), encode((" " if leading_space else "") + word)
        ids = torch.tensor((ctx + tgt)[-L:])
        with torch.no_grad():
            logits = hf(ids[None]).logits[0]  # (T, V)
        pred = logits[len(ids) - len(tgt) - 1:-1]  # positions that predict the target tokens
        logp = torch.log_softmax(pred, -1)[torch.arange(len(tgt)), torch.tensor(tgt)]
        nlls += (-logp).tolist()
        per_example.append(float(-logp.sum()))
        correct += bool((pred.argmax(-1) == torch.tensor(tgt)).all())
    mean = sum(nlls) / len(nlls)
    return {"examples": len(texts), "tokens": len(nlls), "nll": mean, "perplexity": math.exp(mean),
            "word_perplexity": math.exp(sum(per_example) / len(per_example)),
            "accuracy": correct / len(texts)}


def make_hf(folder: Path, vocab: int, seed: int):
    """A random float64 GPT2LMHeadModel saved with save_pretrained (dropout off)."""
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=BLOCK, n_embd=64, n_layer=2,
                                     n_head=4, initializer_range=0.1, bos_token_id=None,
                                     eos_token_id=None)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).double().eval()
    hf.save_pretrained(folder)
    return hf


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, gpt2_tokenizer_dir):
    """(hf model, numgpt model) for a GPT-2-vocabulary model with its tokenizer files."""
    folder = tmp_path_factory.mktemp("hf_eval")
    hf = make_hf(folder, 50257, seed=0)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, folder / name)
    model = numgpt.load(folder)
    assert model.wte.weight.data.dtype == np.float64 and model.tokenizer is not None
    return hf, model, folder


@pytest.fixture(scope="module")
def text_ids(shakespeare_path, tok) -> list[int]:
    text = shakespeare_path.read_text(encoding="utf-8")[:1600]
    return tok.encode(text)[:400]


@pytest.fixture(scope="module")
def lambada_texts(shakespeare_path) -> list[str]:
    """Passages of 8 to 90 words (the long ones exceed the 64-token context)."""
    words = shakespeare_path.read_text(encoding="utf-8")[3000:20000].split()
    out, i = [], 0
    for n in (8, 15, 25, 40, 90, 12, 30, 60, 10, 20):
        out.append(" ".join(words[i:i + n]))
        i += n
    return out


# ------------------------------------------------------------------------ perplexity


@pytest.mark.parametrize("stride", [None, 7, BLOCK - 1, BLOCK, 1])
def test_perplexity_equals_the_course_protocol_oracle(bpe, text_ids, stride):
    hf, model, _ = bpe
    ids = {1: text_ids[:90], 7: text_ids[:200]}.get(stride, text_ids)  # small strides: many windows
    ours = perplexity(model, ids, stride=stride, progress=False)
    ref = ref_perplexity(hf, ids, stride or BLOCK // 2)
    record(f"course protocol: perplexity, {len(ids)} BPE tokens, stride {stride or BLOCK // 2}",
           ours, ref, COURSE_TOL)
    assert ours["tokens"] == len(ids) - 1
    assert_close(ours, ref, COURSE_TOL)


@pytest.mark.parametrize("stride", [BLOCK // 2, 7])
def test_negative_control_the_hf_guide_alignment_misses_the_course_oracle(bpe, text_ids, stride):
    """numgpt's protocol before this one (the HF guide's) scores the same tokens with other
    contexts: it must fail the course gate, or the gate could not tell the two apart."""
    hf, model, _ = bpe
    ids = text_ids[:200]
    course = ref_perplexity(hf, ids, stride)
    guide = ref_perplexity_hf_guide(hf, ids, stride)
    record(f"control: HF-guide alignment vs course oracle, stride {stride} (must differ)",
           guide, course, COURSE_TOL)
    assert guide["tokens"] == course["tokens"] == len(ids) - 1
    assert abs(guide["nll"] - course["nll"]) > COURSE_TOL * abs(course["nll"])


def test_perplexity_of_a_text_shorter_than_the_context_is_one_window(bpe, text_ids):
    hf, model, _ = bpe
    ids = text_ids[:40]
    ours = perplexity(model, ids, progress=False)
    with torch.no_grad():
        hf_loss = float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss)  # float32 inside
    assert_close(ours, ref_perplexity(hf, ids, BLOCK // 2))
    assert ours["nll"] == pytest.approx(hf_loss, rel=1e-6)  # and HF's own labels= loss



def test_bits_per_byte_is_the_summed_nll_in_bits_over_the_scored_bytes(bpe, text_ids):
    """Shakespeare is ASCII, so the scored tokens' bytes are the decoded text's length less
    the first token's; the NLL sum comes from the course oracle."""
    hf, model, _ = bpe
    ids = text_ids[:150]
    ours = perplexity(model, ids, progress=False)
    ref = ref_perplexity(hf, ids, BLOCK // 2)
    text = model.tokenizer.decode(ids)
    assert text.isascii()
    n_bytes = len(text) - len(model.tokenizer.decode(ids[:1]))
    assert ours["bytes"] == n_bytes
    assert ours["bits_per_byte"] == pytest.approx(ref["nll"] * ref["tokens"] / (math.log(2) * n_bytes),
                                                  rel=1e-12)


def test_max_tokens_scores_a_prefix(bpe, text_ids):
    hf, model, _ = bpe
    ours = perplexity(model, text_ids, max_tokens=300, progress=False)
    assert_close(ours, ref_perplexity(hf, text_ids[:300], BLOCK // 2))
    assert ours["tokens"] == 299


def test_negative_control_scoring_overlapping_tokens_twice_misses_the_reference(bpe, text_ids):
    hf, model, _ = bpe
    ours = perplexity(model, text_ids, progress=False)
    wrong = ref_perplexity(hf, text_ids, BLOCK // 2, count_overlap_twice=True)
    record("control: overlap scored twice (must differ)", ours, wrong)
    assert wrong["tokens"] > ours["tokens"]
    assert abs(wrong["nll"] - ours["nll"]) > REL_TOL * abs(ours["nll"])


def coverage_errors(plan, n: int, L: int, stride: int) -> list[str]:
    """Every token 1..n-1 scored once, windows read <= L tokens, contexts as the course's
    protocol says (a window reads [begin, end) and scores tokens score_from..end)."""
    errors, seen = [], []
    for w_index, w in enumerate(plan):
        if w.end - w.begin > L:
            errors.append(f"window {w} longer than {L}")
        for p in range(w.score_from, w.end + 1):
            seen.append(p)
            context = p - w.begin
            if w_index == 0 and context != p:
                errors.append(f"first window: token {p} has context {context}")
            if w_index > 0 and not L - stride + 1 <= context <= L:
                errors.append(f"token {p} has context {context}, not in [{L - stride + 1}, {L}]")
    if sorted(seen) != list(range(1, n)):
        errors.append("tokens scored are not exactly 1..n-1 once each")
    return errors


def test_every_token_from_the_second_is_scored_exactly_once_with_the_stated_context():
    for n in (2, 3, 10, 64, 65, 100, 257, 1000):
        for L in (2, 8, 64):
            for stride in sorted({1, L // 2 or 1, L - 1, L, 3 if L > 3 else 1}):
                assert coverage_errors(windows(n, L, stride), n, L, stride) == []


def test_negative_control_coverage_check_catches_a_wrong_plan():
    from numgpt.infer.evaluate import Window

    plan = windows(100, 16, 8)
    every_window_from_its_start = [Window(w.begin, w.end, w.begin + 1) for w in plan]
    assert coverage_errors(every_window_from_its_start, 100, 16, 8)


def test_token_nll_entries_are_the_per_token_reference(bpe, text_ids):
    hf, model, _ = bpe
    ids = text_ids[:BLOCK]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1)
    ref = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(token_nll(model, ids), ref, rtol=1e-10)


@pytest.mark.parametrize("kwargs, words", [(dict(stride=BLOCK + 1), "stride"), (dict(stride=0), "stride"),
                                           (dict(max_tokens=1), "max_tokens")])
def test_bad_perplexity_arguments_are_refused(bpe, text_ids, kwargs, words):
    with pytest.raises(InputError, match=words):
        perplexity(bpe[1], text_ids, progress=False, **kwargs)


def test_ids_outside_the_vocabulary_are_refused():
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(InputError, match="300 at position 2"):
        perplexity(model, [1, 2, 300], progress=False)


# --------------------------------------------------------------------------- LAMBADA


def test_lambada_equals_the_course_protocol_oracle(bpe, lambada_texts, tok):
    hf, model, _ = bpe
    ours = lambada(model, lambada_texts, tok)
    ref = ref_lambada(hf, lambada_texts, tok.encode)
    record(f"course protocol: LAMBADA, {len(lambada_texts)} examples, GPT-2 BPE", ours, ref, COURSE_TOL)
    assert_close(ours, ref, COURSE_TOL)
    wrong = ref_lambada(hf, lambada_texts, tok.encode, leading_space=False)  # negative control
    assert abs(wrong["nll"] - ours["nll"]) > REL_TOL * abs(ours["nll"])


def hf_argmax(hf, ids: list[int]) -> int:
    with torch.no_grad():
        return int(hf(torch.tensor([ids])).logits[0, -1].argmax())


def test_lambada_accuracy_counts_hand_made_examples(bpe, tok, tmp_path):
    """Three examples whose outcome is known from direct transformers calls: a one-token
    target that is the argmax (right), a target whose first token is not (wrong), and a
    two-token target whose first token is the argmax but whose second is not (wrong)."""
    hf, model, _ = bpe
    contexts = ["The ship sailed", "She opened the door and saw", "In the morning we",
                "He said that", "They walked along the river to", "It was a", "My friend"]
    right = partial = None
    for context in contexts:
        g = hf_argmax(hf, tok.encode(context))
        word = tok.decode([g])
        if not (word.startswith(" ") and len(word) > 1 and " " not in word[1:]
                and tok.encode(word) == [g] and word.strip().isalpha()):
            continue
        if right is None:
            right = context + word
            continue
        after = hf_argmax(hf, tok.encode(context) + [g])
        for suffix in ("s", "ing", "ed", "ly", "er", "est"):
            ids = tok.encode(word + suffix)
            if ids[:1] == [g] and len(ids) == 2 and ids[1] != after:
                partial = context + word + suffix
                break
        if partial:
            break
    assert right and partial, "no context with a plain-word argmax; extend the context list"
    wrong_ctx = "The king spoke to"
    g = hf_argmax(hf, tok.encode(wrong_ctx))
    wrong_word = next(w for w in (" castle", " garden", " horse") if tok.encode(w)[0] != g)
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (right, wrong_ctx + wrong_word, partial)))
    texts = load_lambada_jsonl(path)
    res = lambada(model, texts, tok)
    n_tokens = sum(len(tok.encode(split_last_word(t)[1])) for t in texts)
    assert res["examples"] == 3 and res["tokens"] == n_tokens
    assert res["accuracy"] == pytest.approx(1 / 3)
    assert lambada(model, [right], tok)["accuracy"] == 1.0
    assert lambada(model, [partial], tok)["accuracy"] == 0.0  # control: one wrong token is enough


def test_split_last_word_keeps_the_leading_space():
    assert split_last_word("the cat sat on the mat") == ("the cat sat on the", " mat")
    assert split_last_word("trailing space  \n") == ("trailing", " space")
    with pytest.raises(InputError, match="last word"):
        split_last_word("oneword")


@pytest.mark.parametrize("content, words", [
    ('{"text": "a b"}\n{"text": broken}\n', ":2: not valid JSON"),
    ('{"text": "a b"}\n\n{"txt": "a b"}\n', ':3: expected an object with a string "text"'),
    ('["a b"]\n', ":1: expected an object"), ("", "no examples")])
def test_bad_lambada_files_name_the_line(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=words):
        load_lambada_jsonl(path)


def test_lambada_file_loads_texts_and_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a b"}\n\n{"text": "ünï côdé x"}\n')
    assert load_lambada_jsonl(path) == ["a b", "ünï côdé x"]


# ------------------------------------------------------------------------ byte model

BYTE_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
             "it was the age of foolishness, it was the epoch of belief. Ünïcödé too. ") * 3


def test_byte_level_model_evaluates_equal_to_the_reference(tmp_path):
    hf = make_hf(tmp_path, 256, seed=3)
    model = numgpt.load(tmp_path)
    bt = ByteTokenizer()
    ids = bt.encode(BYTE_TEXT)
    ours = perplexity(model, ids, stride=20, progress=False, tokenizer=bt)
    ref = ref_perplexity(hf, ids, 20)
    record(f"course protocol: perplexity, {len(ids)} bytes, stride 20 (byte model)", ours, ref,
           COURSE_TOL)
    assert_close(ours, ref, COURSE_TOL)
    assert ours["bits_per_byte"] == pytest.approx(ref["nll"] / math.log(2), rel=1e-12)  # 1 token = 1 byte
    texts = [BYTE_TEXT[:n] for n in (30, 75, 140)]
    ours_l = lambada(model, texts, bt)
    ref_l = ref_lambada(hf, texts, bt.encode)
    record("course protocol: LAMBADA, 3 examples (byte model)", ours_l, ref_l, COURSE_TOL)
    assert_close(ours_l, ref_l, COURSE_TOL)


# ------------------------------------------------------------------------------- CLI


def test_cli_eval_json_reports_both_tasks(bpe, lambada_texts, shakespeare_path, tok, tmp_path, capsys):
    hf, _, folder = bpe
    text_file = tmp_path / "t.txt"
    text_file.write_text(shakespeare_path.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    lam_file = tmp_path / "l.jsonl"
    lam_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada_texts))
    rc = main(["eval", "--model", str(folder), "--text", str(text_file), "--lambada", str(lam_file),
               "--stride", "16", "--max-tokens", "200", "--max-examples", "4", "--json", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "lambada"}
    assert_close(out["text"], ref_perplexity(hf, tok.encode(text_file.read_text(encoding="utf-8"))[:200], 16))
    assert_close(out["lambada"], ref_lambada(hf, lambada_texts[:4], tok.encode))


def test_cli_eval_needs_a_task_and_reports_missing_files(bpe, capsys):
    folder = bpe[2]
    assert main(["eval", "--model", str(folder)]) == 2
    assert "--text FILE and/or --lambada FILE" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--text", "/nonexistent/file.txt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_eval_prints_both_lambada_perplexities_labelled(bpe, lambada_texts, tok, tmp_path, capsys):
    """The per-token perplexity and the per-word one (lm-eval's "perplexity") are both printed
    and named, each equal to the course oracle's; the JSON carries both under their keys."""
    import re

    hf, _, folder = bpe
    lam_file = tmp_path / "l.jsonl"
    lam_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada_texts))
    ref = ref_lambada(hf, lambada_texts[:4], tok.encode)
    args = ["eval", "--model", str(folder), "--lambada", str(lam_file), "--max-examples", "4",
            "--no-progress"]
    assert main(args) == 0
    line = capsys.readouterr().out
    found = re.search(r"perplexity per token ([\d.]+), per word ([\d.]+) \(lm-eval's perplexity\)", line)
    assert found, line
    assert float(found.group(1)) == pytest.approx(ref["perplexity"], rel=1e-4)
    assert float(found.group(2)) == pytest.approx(ref["word_perplexity"], rel=1e-4)
    assert ref["word_perplexity"] > 1.5 * ref["perplexity"]  # the two differ: labels matter
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)["lambada"]
    assert out["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-9)
    assert out["word_perplexity"] == pytest.approx(ref["word_perplexity"], rel=1e-9)


def _contexts(n_tokens: int, block_size: int, stride: int) -> tuple[dict[int, int], set[int]]:
    """token -> tokens of left context it is scored with; and the tokens the first window scores."""
    plan = windows(n_tokens, block_size, stride)
    seen = {t: t - w.begin for w in plan for t in range(w.score_from, w.end + 1)}
    return seen, set(range(plan[0].score_from, plan[0].end + 1))


def test_readme_states_the_stride_rule_the_code_runs():
    """The README's perplexity paragraph (it said `block_size - stride` .. `block_size - 1`
    tokens of context and a stride below block_size) against windows() on a small grid."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    text = " ".join(readme[readme.index("**Perplexity protocol.**"):].split("\n\n")[0].split())
    bounds = re.search(r"sees between `([^`]+)` and `([^`]+)` tokens of left context", text)
    assert bounds, "the README's perplexity paragraph lost its context bounds"
    assert "The stride may be 1 to `block_size`" in text
    assert "The first window scores tokens 1 to `block_size`" in text
    for L, stride, n in [(4, 2, 10), (4, 4, 10), (4, 1, 7), (8, 3, 40), (16, 16, 50), (16, 5, 100)]:
        env = {"block_size": L, "stride": stride}
        lo, hi = (eval(b, {}, env) for b in bounds.groups())  # noqa: S307 (README arithmetic)
        seen, first = _contexts(n, L, stride)
        assert sorted(seen) == list(range(1, n))  # every token from the second on, once
        assert first == set(range(1, L + 1))
        later = [c for t, c in seen.items() if t not in first]
        assert later and min(later) >= lo and max(later) <= hi, (L, stride, later, lo, hi)
        assert hi in later  # the bounds are tight where the text runs long enough
        if stride > 1:
            assert lo in later
    with pytest.raises(InputError, match="stride must lie in"):
        windows(10, 4, 5)
