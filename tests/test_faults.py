"""The fault table (issue 10), all but the server's rows (``tests/test_faults_serve.py``):
crashes, full disks, read-only folders, signals, crafted files, planted symlinks. Each case
runs the real command (``numgpt ...`` through ``cli.main``, or a subprocess where the
process must die or be limited) as a careless operator or a hostile file would, and writes
its row (what happened, what is expected, PASS/FAIL) to ``docs/results/faults.md`` through
``tests/results_table.py``; the row is written before the test asserts, so a FAIL is seen.

Crash cases stop a training subprocess with SIGKILL at a named point of a checkpoint save
(``numgpt.io.checkpoint.save_hooks``, set by the driver script below, never by an
environment switch), resume in this process, and compare the final weights, AdamW moments
and step losses with an uninterrupted run, bit for bit. A full disk is a small tmpfs filled
up at a named point (or, where mounting is not allowed, a file-size limit set there); a
read-only folder is a tmpfs remounted read-only. Tiny models: the module runs in well under
two minutes on two cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import results_table
from numgpt.cli import main
from numgpt.core.model import GPT, GPTConfig
from numgpt.io import checkpoint
from numgpt.io.data import prepare
from numgpt.io.files import TEMP_SUFFIX
from numgpt.io.tokenizer import ByteTokenizer
from numgpt.train.loop import train

REPO = Path(__file__).resolve().parents[1]
# lr_decay_iters fixed, so a run's learning rates do not depend on max_iters (resume adds steps)
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
            sample_tokens=0, plot=False, warmup_iters=2, learning_rate=3e-3, min_lr=3e-4,
            lr_decay_iters=100, log_interval=2, dropout=0.1, workers=1, eval_interval=2,
            checkpoint_interval=2)
STEPS = 8
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# Runs `numgpt ARGV...` after arming one hook at a named point of checkpoint saves: on the
# nth save of PREFIX reaching POINT it kills the process (SIGKILL), sends it SIGTERM, or
# fills the disk (a ballast file until ENOSPC; else a file-size limit just below the size
# of the file that save wrote).
DRIVER = r"""
import json, os, resource, signal, sys
from pathlib import Path
from numgpt.io import checkpoint
plan = json.loads(sys.argv[1])
seen = [0]

def fill_disk(prefix):
    if plan.get("ballast"):
        fd = os.open(plan["ballast"], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        for size in (1 << 16, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
        os.close(fd)
    else:  # no tmpfs: every write past this size fails with EFBIG instead
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = Path(str(prefix) + ".safetensors").stat().st_size - 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

def hook(prefix):
    if prefix.name != plan["prefix"]:
        return
    seen[0] += 1
    if seen[0] == plan["nth"]:
        if plan["action"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif plan["action"] == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            fill_disk(prefix)

checkpoint.save_hooks[plan["point"]] = hook
from numgpt.cli import main
code = main(plan["argv"])
print(json.dumps({"hook_fired": seen[0] >= plan["nth"]}))
sys.exit(code)
"""


# ------------------------------------------------------------------------- helpers

def record(case: str, happened: str, expected: str, ok: bool) -> None:
    """Write the case's row, then fail the test if it did not hold."""
    results_table.record("faults.md", case, happened, expected, "PASS" if ok else "FAIL")
    assert ok, f"{case}: {happened} (expected: {expected})"


def run_cli(argv: list[str], capsys) -> tuple[object, str, str]:
    """``numgpt ARGV`` in this process: (exit status, or 'raised X: msg'; stdout; stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - a traceback is what the old code gave
        code = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err: str, *words: str) -> bool:
    """Exit status 2 with exactly one ``numgpt: error:`` line holding ``words``, no traceback."""
    lines = [l for l in err.splitlines() if l.startswith("numgpt: error:")]
    return (code == 2 and len(lines) == 1 and "Traceback" not in err
            and all(w.lower() in lines[0].lower() for w in words))


def said(code, err: str) -> str:
    """The exit status and the error line (or the last line), folders shortened to ``.../``."""
    lines = [l for l in err.splitlines() if l.startswith("numgpt: error:")]
    text = lines[0] if lines else (err.strip().splitlines() or [""])[-1]
    return f"exit {code}: {_FOLDERS.sub('.../', text)[:300]}"


_FOLDERS = re.compile(r"(/[^/\s'\"]+)+/")  # the folders of an absolute path


def subprocess_python(code: str, *args: str, limit_as: int | None = None,
                      timeout: float = 120) -> subprocess.CompletedProcess:
    def limits():
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout, preexec_fn=limits)


def toml_file(path: Path, config: dict) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def final_state(out: Path) -> tuple[dict, dict, list[float]]:
    """(weights, extra arrays, step losses) of the run in ``out``, from its files."""
    model, _, arrays = checkpoint.load_checkpoint(out / "latest")
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
              if r["kind"] == "step"]
    return {n: p.data for n, p in model.parameters().items()}, arrays, losses


def same_state(a, b) -> bool:
    (wa, xa, la), (wb, xb, lb) = a, b
    return (la == lb and wa.keys() == wb.keys() and xa.keys() == xb.keys()
            and all(np.array_equal(wa[k], wb[k]) for k in wa)
            and all(np.array_equal(xa[k], xb[k]) for k in xa))


@contextmanager
def tmpfs(size: str):
    """A fresh tmpfs of ``size`` (root only), unmounted afterwards; None where not allowed."""
    folder = Path(tempfile.mkdtemp(prefix="numgpt-faults-"))
    ok = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    try:
        yield folder if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    import importlib

    folder = tmp_path_factory.mktemp("data")
    topics = importlib.import_module("pydoc_data.topics").topics
    (folder / "input.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:20_000])
    prepare([folder / "input.txt"], ByteTokenizer(), folder, val_fraction=0.1, progress=False)
    return folder


def run_config(data_dir: Path, out: Path, **overrides) -> dict:
    return {**TINY, "data": str(data_dir), "out": str(out), "max_iters": STEPS, **overrides}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run of STEPS steps: (its folder, its final state)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(run_config(data_dir, out), progress=False)
    return out, final_state(out)


def run_driver(plan: dict, config: dict, tmp: Path) -> subprocess.CompletedProcess:
    argv = ["train", "--quiet", "--config", str(toml_file(tmp / "run.toml", config))]
    return subprocess_python(DRIVER, json.dumps({**plan, "argv": argv}))


def resume(out: Path, capsys):
    return run_cli(["train", "--out", out, "--resume", "--quiet", "--max-iters", STEPS], capsys)


# ------------------------------------------------------------- 1: kill -9 in a save

KILLS = [  # (case, save point, checkpoint, which save of it)
    ("1 kill -9 after the weights temporary of latest is written", "weights_written", "latest", 2),
    ("1 kill -9 after both temporaries of latest are written", "config_written", "latest", 2),
    ("1 kill -9 between the two renames of latest", "weights_renamed", "latest", 2),
    ("1 kill -9 after both renames of latest", "config_renamed", "latest", 2),
    ("1 kill -9 between the two renames of best", "weights_renamed", "best", 3),
]


@pytest.mark.parametrize("case, point, prefix, nth", KILLS, ids=[k[1] + "-" + k[2] for k in KILLS])
def test_kill_at_each_point_of_a_save_then_resume_is_exact(case, point, prefix, nth, data_dir,
                                                           reference, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_driver({"point": point, "prefix": prefix, "nth": nth, "action": "kill"},
                      run_config(data_dir, out), tmp_path)
    left = temporaries(out)
    try:  # what --resume will find: the old or the new complete save, never a mix
        found = checkpoint.load_checkpoint(out / "latest")[1]["step"]
        best = checkpoint.load(out / "best") is not None
    except Exception as e:  # noqa: BLE001
        found, best = f"unloadable ({type(e).__name__}: {str(e)[:120]})", False
    code, _, err = resume(out, capsys)
    after = temporaries(out)
    exact = code == 0 and same_state(final_state(out), reference[1])
    ok = proc.returncode == -signal.SIGKILL and isinstance(found, int) and best and exact and not after
    record(case, f"killed (rc {proc.returncode}) leaving {len(left)} temporaries; latest loads at "
                 f"step {found}, best loads: {best}; resume {said(code, err) if code else 'exit 0'}, "
                 f"{'equal' if exact else 'NOT equal'} to the uninterrupted run bit for bit; "
                 f"temporaries left after resume: {after or 'none'}",
           "old or new complete save loads; resume exit 0 and bit-identical weights, moments "
           "and losses; orphaned temporaries removed", ok)


def test_sigterm_during_training_saves_and_resumes_exactly(data_dir, reference, tmp_path, capsys):
    """SIGTERM is handled by the training loop (train/loop.py, the MPI helper's handler):
    the step finishes, latest is saved, the process exits 130 with a message."""
    out = tmp_path / "run"
    proc = run_driver({"point": "config_renamed", "prefix": "latest", "nth": 1, "action": "term"},
                      run_config(data_dir, out), tmp_path)
    stopped = checkpoint.load_checkpoint(out / "latest")[1]["step"]
    code, _, err = resume(out, capsys)
    exact = code == 0 and same_state(final_state(out), reference[1])
    ok = (proc.returncode == 130 and "SIGTERM" in proc.stderr and "numgpt: saved" in proc.stderr
          and stopped < STEPS and exact)
    record("3 SIGTERM during training", f"exit {proc.returncode}, saved latest at step {stopped} "
           f"({'message printed' if 'numgpt: saved' in proc.stderr else 'no message'}); resume "
           f"{'exit 0, bit-identical to the uninterrupted run' if exact else said(code, err)}",
           "finish the step, save latest, exit 130 with a message; resume is exact", ok)


# ------------------------------------------------------------- 2: full disk, torn log

def test_torn_last_log_line_is_dropped_on_resume(data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    train(run_config(data_dir, out, max_iters=4), progress=False)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 5, "loss": 2.71')  # the disk filled mid-line
    code, _, err = resume(out, capsys)
    exact = code == 0 and same_state(final_state(out), reference[1])
    warned = "dropped the torn last line" in err
    record("2 torn last line in log.jsonl, then --resume",
           f"{'exit 0' if code == 0 else said(code, err)}; warning printed: {warned}; "
           f"{'bit-identical to the uninterrupted run' if exact else 'NOT equal to the uninterrupted run'}",
           "the torn line is dropped with a warning and the run resumes exactly", exact and warned)


@pytest.mark.parametrize("limit", ["tmpfs", "file-size limit"])
def test_disk_full_while_training_stops_cleanly_and_resumes(limit, data_dir, reference, tmp_path,
                                                            capsys):
    """After the first save of latest the disk fills up (a ballast file fills a 2 MiB tmpfs),
    or, without root, RLIMIT_FSIZE drops below a checkpoint's size; a later write fails."""
    with tmpfs("2m") as mount:
        if limit == "tmpfs" and mount is None:
            pytest.skip("mounting a tmpfs needs root; the file-size-limit case covers a full disk")
        where = mount if limit == "tmpfs" else tmp_path
        out = where / "run"
        plan = {"point": "config_renamed", "prefix": "latest", "nth": 1, "action": "fill",
                "ballast": str(where / "ballast") if limit == "tmpfs" else None}
        proc = run_driver(plan, run_config(data_dir, out), tmp_path)
        kept = checkpoint.load_checkpoint(out / "latest")[1]["step"]
        left = temporaries(out)
        (where / "ballast").unlink(missing_ok=True)  # space freed (this process has no limit)
        code, _, err = resume(out, capsys)
        exact = code == 0 and same_state(final_state(out), reference[1])
    how = "a 2 MiB tmpfs filled up" if limit == "tmpfs" else "RLIMIT_FSIZE below a checkpoint's size"
    ok = (one_line_error(proc.returncode, proc.stderr, "disk full", str(out)) and kept == 2
          and not left and exact)
    record(f"2 disk full while training ({how})",
           f"{said(proc.returncode, proc.stderr)}; latest kept at step {kept}; temporaries left: "
           f"{left or 'none'}; after freeing space resume "
           f"{'is bit-identical to the uninterrupted run' if exact else said(code, err)}",
           "one line saying disk full and naming the file, the previous checkpoint kept, a clean "
           "stop; resume exact", ok)


# ------------------------------------------------------------- 9: read-only folders

@pytest.fixture(scope="module")
def read_only(data_dir, reference):
    """A folder holding a finished run, a prepared data folder and a model, made read-only:
    a tmpfs remounted read-only as root (chmod does not stop root), chmod 555 otherwise.
    Yields (folder, its file hashes, how)."""
    folder = Path(tempfile.mkdtemp(prefix="numgpt-ro-"))
    root = os.geteuid() == 0
    mounted = root and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                                      capture_output=True).returncode == 0
    if root and not mounted:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip("running as root without permission to mount a tmpfs: no way to make a "
                    "folder read-only for root here (chmod does not stop root)")
    shutil.copytree(reference[0], folder / "run")
    shutil.copytree(data_dir, folder / "data")
    checkpoint.save(tiny_model(), folder / "model")
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        for p in (folder, folder / "run", folder / "data"):
            os.chmod(p, 0o555)
    try:
        yield folder, snapshot(folder), "a tmpfs remounted read-only" if mounted else "chmod 555"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            for p in (folder, folder / "run", folder / "data"):
                os.chmod(p, 0o755)
        shutil.rmtree(folder, ignore_errors=True)


READ_ONLY = {  # case -> argv (RO: the read-only folder, DATA: a writable prepared folder)
    "train": ["train", "--quiet", "--data", "DATA", "--out", "RO/new-run", "--max-iters", "2",
              "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
              "--batch-size", "2", "--workers", "1", "--no-plot", "--sample-tokens", "0"],
    "resume": ["train", "--quiet", "--out", "RO/run", "--resume", "--max-iters", "10"],
    "prepare": ["prepare", "--input", "DATA/input.txt", "--out", "RO/data"],
    "convert": ["convert", "RO/model", "RO/converted"],
    "trace": ["trace", "--model", "RO/model", "--ids", "1 2 3", "-n", "2", "--out", "RO/t.npz"],
}


@pytest.mark.parametrize("command", list(READ_ONLY))
def test_read_only_output_folder_is_one_line_and_keeps_the_files(command, read_only, data_dir, capsys):
    folder, before, how = read_only
    argv = [a.replace("RO", str(folder)).replace("DATA", str(data_dir)) for a in READ_ONLY[command]]
    code, _, err = run_cli(argv, capsys)
    intact = snapshot(folder) == before
    ok = one_line_error(code, err, "cannot write", str(folder)) and intact
    record(f"9 read-only output folder: {command}",
           f"{said(code, err)}; files intact: {intact} ({how})",
           "one line naming the file and the fix; the old files intact", ok)


# ---------------------------------------------------------- 4, 9, 11: crafted files

def tiny_model(seed: int = 1, **overrides) -> GPT:
    model = GPT(GPTConfig(**{**dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16),
                             **overrides}), seed=seed)
    model.tokenizer = ByteTokenizer()
    return model


LOAD_IN_A_LIMITED_PROCESS = r"""
import sys
from numgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""
LIMIT = 3 << 30  # address space of the limited process: the old code ran into it allocating


def test_checkpoint_claiming_100000_layers_is_refused_before_allocation(tmp_path):
    prefix = checkpoint.save(tiny_model(n_embd=64), tmp_path / "ck")  # 100000 such layers: 20 GB
    doc = json.loads((tmp_path / "ck.json").read_text())
    doc["model"]["n_layer"] = 100_000
    (tmp_path / "ck.json").write_text(json.dumps(doc))
    weights = tmp_path / "ck.safetensors"  # and the copy inside the weights, so both agree
    from safetensors.numpy import load_file, save_file
    from numgpt.io.recovery import DOC_KEY

    tensors, meta = load_file(str(weights)), checkpoint._header(weights)[0]["__metadata__"]
    save_file(tensors, str(weights), metadata={**meta, DOC_KEY: json.dumps(doc)})
    proc = subprocess_python(LOAD_IN_A_LIMITED_PROCESS, "info", str(prefix), limit_as=LIMIT)
    ok = one_line_error(proc.returncode, proc.stderr, "missing", "n_layer=100000")
    record("4 numgpt checkpoint whose config says n_layer 100000 (weights for 2)",
           said(proc.returncode, proc.stderr) + " (3 GiB address-space limit)",
           "refused from the file's keys before the model is allocated", ok)


def test_hf_config_claiming_vocab_size_10_9_is_refused_before_allocation(tmp_path):
    checkpoint.export_hf(tiny_model(), tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, "vocab_size": 10**9}))
    proc = subprocess_python(LOAD_IN_A_LIMITED_PROCESS, "info", str(tmp_path / "hf"), limit_as=LIMIT)
    ok = one_line_error(proc.returncode, proc.stderr, "shape mismatch", "wte.weight", "1000000000")
    record("4 Hugging Face config.json says vocab_size 10**9 (weights for 256)",
           said(proc.returncode, proc.stderr) + " (3 GiB address-space limit)",
           "refused from the file's shapes before the model is allocated", ok)


def test_training_a_model_larger_than_memory_is_refused_naming_both_sizes(data_dir, tmp_path):
    proc = subprocess_python(LOAD_IN_A_LIMITED_PROCESS, "train", "--quiet", "--data", str(data_dir),
                             "--out", str(tmp_path / "run"), "--n-embd", str(2**31), "--n-head", "1",
                             "--n-layer", "1", "--block-size", "16", "--workers", "1",
                             limit_as=LIMIT)
    ok = one_line_error(proc.returncode, proc.stderr, "needs", "available", "parameters")
    record("4 train with n_embd 2**31 (MemoryError for huge dimensions)",
           said(proc.returncode, proc.stderr), "refused before allocation, naming the memory "
           "needed and the memory available", ok)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    model = tiny_model()
    for p in model.parameters().values():
        p.data[...] = np.nan
    return checkpoint.save(model, tmp_path_factory.mktemp("nan") / "ck")


def test_nan_weights_are_refused_at_load(nan_model, capsys):
    code, out, err = run_cli(["generate", "--model", nan_model, "--prompt", "hi", "-n", "3",
                              "--temperature", "0"], capsys)
    ok = one_line_error(code, err, "NaN or infinite", "--skip-finite-check")
    record("11 checkpoint with all-NaN weights: generate", said(code, err) +
           (f"; printed {out.strip()[:40]!r}" if out.strip() else ""),
           "refused at load, naming the file, the parameter and --skip-finite-check", ok)


def test_eval_json_never_prints_nan(nan_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text to score " * 4)
    code, out, err = run_cli(["eval", "--model", nan_model, "--text", tmp_path / "t.txt",
                              "--json", "--no-progress", "--skip-finite-check"], capsys)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    try:
        doc = json.loads(out, parse_constant=refuse)
        valid = f"valid JSON, perplexity {doc['text']['perplexity']}, notes {len(doc.get('notes', []))}"
    except (ValueError, KeyError) as e:
        doc, valid = None, f"not JSON ({e}): {out.strip()[:80]!r}"
    ok = code == 0 and doc is not None and doc["text"]["perplexity"] is None and doc.get("notes")
    record("11 eval --json on a model whose scores are NaN", f"exit {code}: {valid}",
           "strict JSON: NaN written as null with a note", bool(ok))


@pytest.mark.parametrize("key, edit", [
    ("vocab_size a list", lambda m: m.update(vocab_size=[256])),
    ("tokenizer missing", lambda m: m.pop("tokenizer")),
])
def test_meta_json_with_a_wrong_type_or_missing_key(key, edit, data_dir, tmp_path, capsys):
    bad = Path(shutil.copytree(data_dir, tmp_path / "data"))
    meta = json.loads((bad / "meta.json").read_text())
    edit(meta)
    (bad / "meta.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["train", "--quiet", "--data", bad, "--out", tmp_path / "run",
                            "--workers", "1", "--max-iters", "2", "--n-layer", "1", "--n-embd", "16",
                            "--n-head", "2", "--block-size", "16", "--no-plot", "--sample-tokens", "0"],
                           capsys)
    model = checkpoint.save(tiny_model(), tmp_path / "model")
    sanity = run_cli(["sanity", "--model", model, "--data", bad / "val.bin", "--offset", "20"], capsys)
    ok = all(one_line_error(c, e, "meta.json", key.split()[0], "numgpt prepare")
             for c, _, e in ((code, None, err), sanity))
    record(f"9 meta.json with {key}", f"train: {said(code, err)}; sanity: {said(sanity[0], sanity[2])}",
           "one line naming meta.json, the key and the fix", ok)


EVIL = r"""
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"model_args": {}, "model": {"wte.weight": Evil()}} if sys.argv[3] == "nanogpt"
           else {"transformer.wte.weight": Evil()}, sys.argv[1])
"""


def test_trace_reference_hf_refuses_a_malicious_bin(tmp_path, capsys):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, pwned = tmp_path / "evil", tmp_path / "PWNED"
    transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                            bos_token_id=None, eos_token_id=None).save_pretrained(folder)
    subprocess.run([sys.executable, "-c", EVIL, str(folder / "pytorch_model.bin"), str(pwned), "hf"],
                   check=True, env=ENV)
    code, _, err = run_cli(["trace", "--reference-hf", folder, "--ids", "1 2", "-n", "1",
                            "--out", tmp_path / "t.npz"], capsys)
    ok = one_line_error(code, err, "pytorch", "refused") and not pwned.exists()
    record("9 trace --reference-hf on a pytorch_model.bin holding a code-running pickle",
           f"{said(code, err)}; code ran: {pwned.exists()}",
           "a one-line refusal naming the file; the pickle's code never runs", ok)


def test_nanogpt_pickle_that_runs_code_is_refused(tmp_path, capsys):
    pytest.importorskip("torch")
    pwned = tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", EVIL, str(tmp_path / "ckpt.pt"), str(pwned), "nanogpt"],
                   check=True, env=ENV)
    code, _, err = run_cli(["info", tmp_path / "ckpt.pt"], capsys)
    ok = one_line_error(code, err, "ckpt.pt") and not pwned.exists()
    record("9 nanoGPT ckpt.pt holding a code-running pickle (already passed)",
           f"{said(code, err)}; code ran: {pwned.exists()}", "refused; the code never runs", ok)


def _crafted_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("what, header, data", [
    ("offsets past the end of the file",
     {"wte.weight": {"dtype": "F32", "shape": [256, 16], "data_offsets": [0, 16384]}}, b"\0" * 64),
    ("a header length of 2**60", None, b""),
])
def test_crafted_safetensors_are_refused(what, header, data, tmp_path, capsys):
    checkpoint.export_hf(tiny_model(), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    if header is None:
        weights.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    else:
        _crafted_safetensors(weights, header, data)
    code, _, err = run_cli(["info", tmp_path / "hf"], capsys)
    ok = one_line_error(code, err, "model.safetensors")
    record(f"9 crafted model.safetensors: {what} (already passed)", said(code, err),
           "refused in one line naming the file", ok)


# ------------------------------------------------------------- 8: planted symlinks

OLD_TEMP_NAMES = {  # the predictable temporaries numgpt used to write through
    "run": [".log.jsonl.tmp", ".loss.png.tmp", ".lr.png.tmp", ".grad_norm.png.tmp",
            ".grad_groups.png.tmp", ".val_loss_by_position.png.tmp"],
    "corpus": [".pydoc_topics.txt.tmp"],
    "hf": ["vocab.json.tmp", "merges.txt.tmp"],
}


def test_symlinks_planted_at_the_old_temporary_names_are_not_followed(data_dir, reference, tmp_path,
                                                                       capsys, gpt2_tokenizer_dir):
    from numgpt.io.tokenizer import GPT2Tokenizer
    from numgpt.train.loop import default_corpus

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run, corpus, hf = tmp_path / "run", tmp_path / "corpus", tmp_path / "hf"
    shutil.copytree(reference[0], run)
    for folder in (corpus, hf):
        folder.mkdir()
    for where, names in OLD_TEMP_NAMES.items():
        for name in names:
            os.symlink(victim, tmp_path / where / name)
    code, _, err = run_cli(["train", "--out", run, "--resume", "--quiet", "--max-iters", STEPS + 1,
                            "--plot"], capsys)  # rewrites the log on resume, writes the plots
    default_corpus(corpus)
    model = tiny_model(vocab_size=50257)
    model.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    checkpoint.export_hf(model, hf)
    followed = [f"{w}/{n}" for w, names in OLD_TEMP_NAMES.items() for n in names
                if not (os.path.islink(tmp_path / w / n) and os.readlink(tmp_path / w / n) == str(victim))]
    ok = (code == 0 and victim.read_text() == "precious" and not followed
          and (run / "loss.png").is_file() and (hf / "vocab.json").is_file())
    record("8 symlinks planted at the old temporary names (log rewrite, plots, tokenizer files, "
           "default corpus)",
           f"{'exit 0' if code == 0 else said(code, err)}; victim file "
           f"{'untouched' if victim.read_text() == 'precious' else 'OVERWRITTEN'}; symlinks replaced: "
           f"{followed or 'none'}", "the symlinks and their target are left alone", ok)
