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


# ------------------------------------------------- 20: hostile model files (issue 20)
#
# Files crafted from the valid tiny files of tests/model_files.py. Cases that allocated in
# proportion to a claimed count run in a subprocess under an address-space limit and a
# timeout; the rest run `numgpt info` / `generate` / `convert` in this process.

import model_files as mf  # noqa: E402

BOUNDED_SECONDS = 60


def bounded_cli(*argv, limit_as: int = LIMIT) -> tuple[object, str, float]:
    """``numgpt ARGV`` in a subprocess under ``limit_as`` bytes of address space and
    ``BOUNDED_SECONDS``: (exit status or "hung", stderr, seconds)."""
    import time

    start = time.perf_counter()
    try:
        proc = subprocess_python(LOAD_IN_A_LIMITED_PROCESS, *map(str, argv), limit_as=limit_as,
                                 timeout=BOUNDED_SECONDS)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, err = "hung", f"still running after {BOUNDED_SECONDS} s (killed)"
    return code, err, time.perf_counter() - start


@pytest.fixture(scope="module")
def gguf_parts(tmp_path_factory):
    """A valid f32 and q8_0 GGUF of a GPT-2 BPE-free byte model, as editable parts."""
    folder = tmp_path_factory.mktemp("gguf")
    return {dtype: mf.read_gguf_parts(mf.gguf_file(folder / f"{dtype}.gguf", dtype))
            for dtype in ("f32", "q8_0")}


def _parts(gguf_parts, dtype="f32") -> mf.GGUFParts:
    import copy

    return copy.deepcopy(gguf_parts[dtype])


def test_a_49_byte_gguf_claiming_2_40_array_elements_is_one_line(tmp_path):
    import struct

    raw = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1)  # version 3, no tensors, one key/value
           + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", mf.T.ARRAY, mf.T.UINT8, 1 << 40))
    path = tmp_path / "tiny.gguf"  # an array of 2^40 uint8, and not one byte of them
    path.write_bytes(raw)
    code, err, seconds = bounded_cli("info", path)
    ok = one_line_error(code, err, str(path), f"{1 << 40:,}") and seconds < 20
    record(f"20.1 GGUF of {len(raw)} bytes whose metadata array claims 2**40 elements",
           f"{said(code, err)} in {seconds:.1f} s (3 GiB address-space limit)",
           "one line naming the file and the claimed count, at once, nothing allocated", ok)


def test_a_gguf_claiming_2_32_blocks_is_compared_with_its_tensors(gguf_parts, tmp_path):
    parts = _parts(gguf_parts).set("gpt2.block_count", mf.T.UINT32, 2**32 - 1)
    path = mf.write_gguf_parts(tmp_path / "blocks.gguf", parts)
    code, err, seconds = bounded_cli("info", path)
    ok = one_line_error(code, err, "block_count", str(2**32 - 1), "2 block") and seconds < 20
    record("20.1 GGUF with gpt2.block_count = 2**32-1 (tensors of 2 blocks)",
           f"{said(code, err)} in {seconds:.1f} s (3 GiB address-space limit)",
           "one line comparing block_count with the blocks the file holds, before any "
           "per-layer name is built", ok)


def _poison(parts: mf.GGUFParts, name: str, value: bytes) -> mf.GGUFParts:
    """Overwrite the first bytes of tensor ``name``'s data with ``value``."""
    t = parts.tensor(name)
    data = bytearray(parts.data)
    data[t["offset"]:t["offset"] + len(value)] = value
    parts.data = bytes(data)
    return parts


NAN_F32 = np.float32(np.nan).tobytes()
INF_F16 = np.float16(np.inf).tobytes()


@pytest.mark.parametrize("dtype, what", [("f32", "a NaN weight"), ("q8_0", "an infinite q8_0 block scale")])
def test_non_finite_gguf_weights_are_refused_unless_skipped(dtype, what, gguf_parts, tmp_path, capsys):
    parts = _poison(_parts(gguf_parts, dtype), "blk.1.ffn_up.weight",
                    NAN_F32 if dtype == "f32" else INF_F16)
    path = mf.write_gguf_parts(tmp_path / f"bad-{dtype}.gguf", parts)
    code, out, err = run_cli(["generate", "--model", path, "--prompt", "hi", "-n", "3",
                              "--temperature", "0"], capsys)
    skipped, _, skip_err = run_cli(["info", path, "--skip-finite-check"], capsys)
    ok = one_line_error(code, err, "NaN or infinite", "blk.1", "--skip-finite-check") and skipped == 0
    record(f"20.2 GGUF ({dtype}) holding {what}: generate, then info --skip-finite-check",
           f"generate {said(code, err)}" + (f"; printed {out.strip()[:40]!r}" if out.strip() else "")
           + f"; with --skip-finite-check {'exit 0' if skipped == 0 else said(skipped, skip_err)}",
           "refused at load naming the tensor and --skip-finite-check, which loads it", ok)


def test_convert_of_a_nan_gguf_is_refused_and_writes_nothing(gguf_parts, tmp_path, capsys):
    path = mf.write_gguf_parts(tmp_path / "nan.gguf", _poison(_parts(gguf_parts), "output_norm.weight", NAN_F32))
    code, _, err = run_cli(["convert", path, tmp_path / "out"], capsys)
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "nan.gguf")
    ok = one_line_error(code, err, "NaN or infinite", "--skip-finite-check") and not written
    record("20.2 numgpt convert nan.gguf out", f"{said(code, err)}; files written: {written or 'none'}",
           "refused before writing a checkpoint numgpt would refuse to load", ok)


def test_an_absurd_gguf_context_length_reports_the_shape_not_memory(gguf_parts, tmp_path):
    parts = _parts(gguf_parts).set("gpt2.context_length", mf.T.UINT64, 1 << 40)
    path = mf.write_gguf_parts(tmp_path / "ctx.gguf", parts)
    code, err, seconds = bounded_cli("info", path)
    ok = one_line_error(code, err, "shape mismatch", "position_embd", str(1 << 40)) and "memory" not in err
    record("20.2 GGUF with gpt2.context_length = 2**40 (position_embd of 16 rows)",
           f"{said(code, err)} in {seconds:.1f} s", "the shape mismatch, found before the memory check", ok)


def test_a_numgpt_json_claiming_10_12_layers_is_refused_at_once(tmp_path):
    from safetensors.numpy import load_file, save_file

    from numgpt.io.recovery import DOC_KEY

    prefix = mf.numgpt_checkpoint(tmp_path / "ck")
    doc = json.loads((tmp_path / "ck.json").read_text())
    doc["model"]["n_layer"] = 10**12
    (tmp_path / "ck.json").write_text(json.dumps(doc))
    weights = tmp_path / "ck.safetensors"  # the copy inside the weights agrees
    tensors, meta = load_file(str(weights)), checkpoint._header(weights)[0]["__metadata__"]
    save_file(tensors, str(weights), metadata={**meta, DOC_KEY: json.dumps(doc)})
    code, err, seconds = bounded_cli("info", prefix)
    ok = one_line_error(code, err, "missing", f"n_layer={10**12}") and seconds < 20
    record("20.3 numgpt checkpoint whose config says n_layer 10**12 (weights for 2)",
           f"{said(code, err)} in {seconds:.1f} s (3 GiB address-space limit)",
           "refused by arithmetic (tensors named vs held) before any name or array is built", ok)


def _bad_utf8_key(parts):
    parts.kvs.insert(0, [b"general.\xff\xfename", mf.T.STRING, "x"])
    return parts


def _ints_as_tokens(parts):
    parts.drop("numgpt.tokenizer")  # so the GPT-2 BPE tokenizer is rebuilt from the table
    return parts.set("tokenizer.ggml.tokens", mf.T.ARRAY, (mf.T.INT32, list(range(256))))


def _scalar_token_embd(parts):
    parts.tensor("token_embd.weight")["dims"] = []
    return parts


def _overlapping(parts):
    parts.tensor("blk.1.ffn_up.bias")["offset"] = parts.tensor("blk.0.ffn_up.bias")["offset"]
    return parts


GGUF_EDITS = [  # (group, what, edit, words the one line must hold)
    ("5", "metadata key with bad UTF-8", _bad_utf8_key, ["UTF-8"]),
    ("5", "numgpt.activation with bad UTF-8",
     lambda p: p.set("numgpt.activation", mf.T.STRING, b"gelu\xff"), ["numgpt.activation", "UTF-8"]),
    ("5", "gpt2.context_length as a string",
     lambda p: p.set("gpt2.context_length", mf.T.STRING, "16"), ["gpt2.context_length", "integer", "string"]),
    ("5", "gpt2.context_length as float NaN",
     lambda p: p.set("gpt2.context_length", mf.T.FLOAT32, float("nan")), ["gpt2.context_length", "integer", "nan"]),
    ("5", "gpt2.embedding_length as an array",
     lambda p: p.set("gpt2.embedding_length", mf.T.ARRAY, (mf.T.UINT32, [32])), ["embedding_length", "integer", "array"]),
    ("5", "layer_norm_epsilon as a string",
     lambda p: p.set("gpt2.attention.layer_norm_epsilon", mf.T.STRING, "1e-5"), ["layer_norm_epsilon", "float", "string"]),
    ("5", "an integer token table (BPE tokenizer)", _ints_as_tokens, ["tokenizer.ggml.tokens", "string", "int32"]),
    ("5", "a 0-dimensional token_embd", _scalar_token_embd, ["token_embd.weight", "2 dimensions"]),
    ("6", "gpt2.block_count as float 2.5",
     lambda p: p.set("gpt2.block_count", mf.T.FLOAT32, 2.5), ["gpt2.block_count", "integer", "2.5"]),
    ("6", 'numgpt.bias as the string "false"',
     lambda p: p.set("numgpt.bias", mf.T.STRING, "false"), ["numgpt.bias", "bool", "false"]),
    ("6", "layer_norm_epsilon = inf",
     lambda p: p.set("gpt2.attention.layer_norm_epsilon", mf.T.FLOAT32, float("inf")), ["layer_norm_epsilon", "finite", "inf"]),
    ("6", "two tensors on the same bytes", _overlapping, ["blk.0.ffn_up.bias", "blk.1.ffn_up.bias", "overlap"]),
    ("6", "a tensor past the end of the file",
     lambda p: p.tensor("output_norm.bias").update(offset=1 << 40) or p, ["output_norm.bias", "file ends"]),
]


@pytest.mark.parametrize("group, what, edit, words", GGUF_EDITS, ids=[e[1] for e in GGUF_EDITS])
def test_crafted_gguf_metadata_is_one_line_naming_the_key(group, what, edit, words, gguf_parts,
                                                          tmp_path, capsys):
    path = mf.write_gguf_parts(tmp_path / "crafted.gguf", edit(_parts(gguf_parts)))
    code, _, err = run_cli(["info", path], capsys)
    ok = one_line_error(code, err, str(path), *words)
    record(f"20.{group} crafted GGUF: {what}", said(code, err),
           "refused in one line naming the key (or tensors), what is expected and what was found", ok)


def test_an_integer_weight_tensor_in_a_numgpt_checkpoint_is_refused(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    prefix = mf.numgpt_checkpoint(tmp_path / "ck")
    weights = tmp_path / "ck.safetensors"
    tensors, meta = load_file(str(weights)), checkpoint._header(weights)[0]["__metadata__"]
    tensors["h.0.ln_1.weight"] = np.ones(tensors["h.0.ln_1.weight"].shape, np.int32)
    save_file(tensors, str(weights), metadata=meta)
    code, _, err = run_cli(["info", prefix], capsys)
    ok = one_line_error(code, err, "h.0.ln_1.weight", "int32")
    record("20.6 numgpt checkpoint with an int32 weight tensor", said(code, err),
           "refused naming the tensor and its dtype (was cast silently)", ok)


@pytest.mark.parametrize("limit", ["tmpfs", "file-size limit"])
def test_convert_to_gguf_on_a_full_disk_is_one_line_and_leaves_no_torn_file(limit, tmp_path):
    src = mf.numgpt_checkpoint(tmp_path / "ck")
    with tmpfs("64k") as mount:
        if limit == "tmpfs" and mount is None:
            pytest.skip("mounting a tmpfs needs root; the file-size-limit case covers a full disk")
        where = mount if limit == "tmpfs" else tmp_path / "out"
        where.mkdir(exist_ok=True)
        fsize = 64 << 10  # the f32 GGUF of the tiny model is about 150 KB

        def limits():
            if limit != "tmpfs":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        proc = subprocess.run([sys.executable, "-c", LOAD_IN_A_LIMITED_PROCESS, "convert", str(src),
                               str(where / "m.gguf")], capture_output=True, text=True, env=ENV,
                              cwd=REPO, timeout=120, preexec_fn=limits)
        left = sorted(p.name for p in where.iterdir())
    how = "a 64 KiB tmpfs" if limit == "tmpfs" else "RLIMIT_FSIZE of 64 KiB"
    ok = one_line_error(proc.returncode, proc.stderr, "disk full", "m.gguf") and not left
    record(f"20.5 numgpt convert X out.gguf on a full disk ({how})",
           f"{said(proc.returncode, proc.stderr)}; files left: {left or 'none'}",
           "one line saying disk full and naming the file; no torn or temporary file", ok)


def test_safetensors_files_get_the_mode_of_the_umask_or_the_previous_file(tmp_path):
    model, old = mf.tiny_model(), os.umask(0o027)
    try:
        checkpoint.save(model, tmp_path / "a")
        checkpoint.export_hf(model, tmp_path / "hf")
        (tmp_path / "b.safetensors").touch()
        os.chmod(tmp_path / "b.safetensors", 0o604)
        checkpoint.save(model, tmp_path / "b")
    finally:
        os.umask(old)
    modes = {p: oct(os.stat(tmp_path / p).st_mode & 0o777)
             for p in ("a.safetensors", "a.json", "hf/model.safetensors", "b.safetensors")}
    want = {"a.safetensors": "0o640", "a.json": "0o640", "hf/model.safetensors": "0o640",
            "b.safetensors": "0o604"}
    record("20.7 mode of a written .safetensors (umask 027; a previous file of mode 604)",
           f"modes {modes}", f"{want}: the umask, or the previous file's mode, like every other writer",
           modes == want)


SAVE_AND_WATCH = r"""
import os, re, sys, threading, time
import numpy as np
from numgpt.io import checkpoint
sys.path.insert(0, "tests")
import model_files as mf
folder = sys.argv[1]
foreign = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # the safetensors library's own temporary

def watch():
    while True:
        if any(foreign.fullmatch(n) for n in os.listdir(folder)):
            os.kill(os.getpid(), 9)
        time.sleep(0.0005)

threading.Thread(target=watch, daemon=True).start()
moments = {"m": np.zeros((64, 1 << 20), np.float32), "v": np.zeros((64, 1 << 20), np.float32)}
for i in range(3):
    checkpoint.save(mf.tiny_model(), os.path.join(folder, "latest"), arrays=moments)
print("saved without a foreign temporary")
"""


def test_no_temporary_of_the_safetensors_library_survives_a_kill(tmp_path):
    """A watcher thread kills the saving process (SIGKILL) the moment a ``.tmpXXXXXX`` of the
    safetensors library appears: the old writer left it behind, never tidied."""
    from numgpt.io.recovery import tidy_folder

    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", SAVE_AND_WATCH, str(folder)], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=300)
    left = sorted(p.name for p in folder.iterdir() if not p.name.startswith("latest."))
    (folder / ".tmpAbC123").write_bytes(b"left by an older numgpt")
    tidied = tidy_folder(folder)
    gone = not (folder / ".tmpAbC123").exists()
    ok = proc.returncode == 0 and not left and gone
    record("20.7 kill -9 while a checkpoint's .safetensors is written (the library's .tmpXXXXXX)",
           f"{'killed: the library temporary appeared' if proc.returncode == -9 else f'exit {proc.returncode}'}; "
           f"left: {left or 'none'}; an old .tmpAbC123 tidied by the next run: {gone} ({len(tidied)} note)",
           "numgpt writes the file itself (no foreign temporary); old ones are tidied", ok)


def test_a_fifo_named_like_a_checkpoint_is_refused_not_waited_on(tmp_path):
    prefix = mf.numgpt_checkpoint(tmp_path / "latest")
    weights = tmp_path / "latest.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    code, err, seconds = bounded_cli("info", prefix)
    gguf = tmp_path / "m.gguf"
    os.mkfifo(gguf)
    gcode, gerr, gseconds = bounded_cli("info", gguf)
    tidy = subprocess_python("import sys; from numgpt.io.recovery import tidy_folder; "
                             "print(tidy_folder(sys.argv[1]))", str(tmp_path), timeout=BOUNDED_SECONDS)
    ok = (one_line_error(code, err, "FIFO", "latest.safetensors")
          and one_line_error(gcode, gerr, "FIFO", "m.gguf") and tidy.returncode == 0)
    record("20.7 a FIFO named latest.safetensors (info, and the run folder's tidy-up) and one named m.gguf",
           f"{said(code, err)} in {seconds:.1f} s; GGUF {said(gcode, gerr)}; tidy exit {tidy.returncode}",
           "one line saying it is a FIFO, not a regular file; nothing waits on it", ok)


RSS_AFTER_LOAD = r"""
import sys
from pathlib import Path
from numgpt.io import checkpoint

def peak_kib():  # VmHWM: the resident high-water mark since the reset below
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the imports peaked higher)
before = peak_kib()
checkpoint.load(sys.argv[1])
print((peak_kib() - before) // 1024)
"""


def test_loading_latest_for_inference_does_not_read_the_adamw_moments(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a load's peak memory")
    moments = {"m": np.ones((64, 1 << 20), np.float32), "v": np.ones((64, 1 << 20), np.float32)}
    prefix = checkpoint.save(mf.tiny_model(), tmp_path / "latest", arrays=moments)  # 512 MiB
    proc = subprocess_python(RSS_AFTER_LOAD, str(prefix))
    grew = int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    back = checkpoint.load_checkpoint(prefix)[2]
    ok = grew is not None and grew < 64 and np.array_equal(back["m"], moments["m"])
    record("20.7 numgpt.load of a latest holding 512 MiB of AdamW moments (model 0.1 MiB)",
           f"peak memory grew by {grew} MiB during the load" if grew is not None else said(proc.returncode, proc.stderr),
           "the moments are not read (under 64 MiB); load_checkpoint still returns them", ok)
