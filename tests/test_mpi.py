"""Training as several MPI ranks (``mpiexec -n 2 numgpt train``) against one process.

Every test launches real processes with the mpich ``mpiexec`` of this environment and a tiny
model, and checks what rank 0 wrote against an independent run:
* 2 ranks == 1 process in float64 (every parameter within 1e-12 after 20 steps, losses too),
  2 ranks repeat bit for bit, and 2 ranks x 1 worker == 1 process x 2 workers bit for bit with
  dropout (same shards, same masks); the negative control (ranks that skip the gradient
  allreduce) fails the 1e-12 gate;
* resume: 2 ranks -> 2 ranks bit for bit, 2 ranks -> 1 process (2 workers: bit for bit;
  1 worker: within 1e-12 in float64);
* SIGTERM to mpiexec saves once and every rank exits; the run resumes exactly;
* a rank killed with SIGKILL ends the job, the last checkpoint stays intact and resumes
  exactly; a rank that hangs (SIGSTOP) is named by the others, which stop;
* ranks launched with different configs are refused before training starts.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from numgpt.io import checkpoint
from numgpt.io.data import prepare
from numgpt.io.tokenizer import ByteTokenizer
from numgpt.train.loop import train

import results_table  # tests/results_table.py: the fault table's one writer


def _mpiexec() -> str:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed: pip install 'numgpt[mpi]' (or the test extra)")
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec next to this Python or on PATH: pip install 'numgpt[mpi]'")
    return found


TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2,
            sample_tokens=0, plot=False, warmup_iters=3, learning_rate=3e-3, min_lr=3e-4,
            log_interval=2, max_iters=20, lr_decay_iters=20, gradient_accumulation_steps=2,
            eval_interval=5, checkpoint_interval=5, dtype="float64", workers=1)

# A test-only driver: installs one fault on one rank at one step, then trains like the CLI.
DRIVER = r'''
import json, os, signal, sys
from numgpt.core.threads import set_blas_threads
set_blas_threads(1, warn=False)
import numgpt.train.loop as loop
import numgpt.train.parallel as parallel

action, rank, at_step, config = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
me = int(os.environ.get("PMI_RANK", "0"))

if action == "skip-allreduce":  # the negative control: every rank keeps its own gradients
    real_sum = parallel.MPIRanks.sum
    def local_only(self, buffer, what):
        if not what.startswith("the gradients"):
            real_sum(self, buffer, what)
    parallel.MPIRanks.sum = local_only
else:
    real_after = loop._after_step
    def after_step(run, bar):
        real_after(run, bar)
        if run.step == at_step and me == rank:
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[action])
    loop._after_step = after_step
loop.train(config, progress=False)
'''


@pytest.fixture(scope="module")
def mpiexec() -> str:
    return _mpiexec()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    topics = importlib.import_module("pydoc_data.topics").topics
    folder = tmp_path_factory.mktemp("data")
    (folder / "input.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000])
    prepare([folder / "input.txt"], ByteTokenizer(), folder, val_fraction=0.1, progress=False)
    return folder


def _flags(config: dict) -> list[str]:
    out = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PMI_SIZE", None)
    return env


def mpi_train(mpiexec, config: dict, ranks: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python -m numgpt train --quiet <config as flags>``."""
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "numgpt", "train", "--quiet", *_flags(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def mpi_driver(mpiexec, tmp_path, action: str, rank: int, step: int, config: dict,
               timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [mpiexec, "-n", "2", sys.executable, str(script), action, str(rank), str(step), json.dumps(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def cfg(data_dir, out, **overrides) -> dict:
    return {**TINY, "data": str(data_dir), "out": str(out), **overrides}


def saved(out) -> tuple[dict, dict, dict]:
    """(weights, meta, optimizer moments) of ``out/latest``."""
    model, meta, arrays = checkpoint.load_checkpoint(Path(out) / "latest")
    return {n: p.data.copy() for n, p in model.parameters().items()}, meta, arrays


def step_losses(out) -> list[float]:
    lines = (Path(out) / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[n] - b[n]).max()) for n in a)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def fault_row(case: str, happened: str, expected: str, passed: bool) -> None:
    """Write the case's row of docs/results/faults.md (as tests/test_faults.py does), then fail
    the test if it did not hold."""
    results_table.record("faults.md", case, happened, expected, "PASS" if passed else "FAIL")
    assert passed, f"{case}: {happened} (expected: {expected})"


# ----------------------------------------------------------------------- equal to one process

@pytest.fixture(scope="module")
def two_ranks(mpiexec, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    ok(mpi_train(mpiexec, cfg(data_dir, out)))
    return out


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    train(cfg(data_dir, out), progress=False)
    return out


def records(out, kind: str) -> list[dict]:
    lines = (Path(out) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_two_ranks_equal_one_process_in_float64(two_ranks, one_process):
    (a, meta, _), (b, _, _) = saved(two_ranks), saved(one_process)
    assert meta["step"] == 20
    assert max_diff(a, b) < 1e-12
    assert np.allclose(step_losses(two_ranks), step_losses(one_process), rtol=0, atol=1e-12)
    assert len(step_losses(two_ranks)) == 20  # rank 0 alone wrote the log: no duplicates
    # the evaluations split their batches over the ranks and sum: the same numbers
    evals = [(records(out, "eval"), records(out, "final")[0]) for out in (two_ranks, one_process)]
    (ev2, final2), (ev1, final1) = evals
    assert [r["step"] for r in ev2] == [r["step"] for r in ev1] == [0, 5, 10, 15, 20]
    for x, y in zip(ev2, ev1):
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-12 and abs(x["train_loss"] - y["train_loss"]) < 1e-12
    assert np.allclose(final2["val_loss_by_position"], final1["val_loss_by_position"], rtol=0, atol=1e-12)


def test_two_ranks_equal_one_process_in_float32(mpiexec, data_dir, tmp_path):
    run = dict(dtype="float32", max_iters=10, lr_decay_iters=10)
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path / "two", **run)))
    train(cfg(data_dir, tmp_path / "one", **run), progress=False)
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert len(two) == len(one) == 10
    assert max(abs(x - y) for x, y in zip(two, one)) < 1e-5


def test_ranks_that_skip_the_gradient_allreduce_fail_the_gate(mpiexec, data_dir, tmp_path, one_process):
    ok(mpi_driver(mpiexec, tmp_path, "skip-allreduce", 0, 0, cfg(data_dir, tmp_path / "run")))
    assert max_diff(saved(tmp_path / "run")[0], saved(one_process)[0]) > 1e-6


def test_two_ranks_repeat_bit_for_bit(mpiexec, data_dir, tmp_path, two_ranks):
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path)))
    assert max_diff(saved(tmp_path)[0], saved(two_ranks)[0]) == 0.0
    assert step_losses(tmp_path) == step_losses(two_ranks)


DROPOUT = dict(dtype="float32", dropout=0.1, max_iters=10, lr_decay_iters=10)


@pytest.fixture(scope="module")
def two_ranks_dropout(mpiexec, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_dropout")
    ok(mpi_train(mpiexec, cfg(data_dir, out, **DROPOUT)))
    return out


def test_two_ranks_equal_two_worker_threads_bit_for_bit_with_dropout(data_dir, tmp_path, two_ranks_dropout):
    """One reduction path: 2 ranks x 1 thread and 1 process x 2 threads run the same two
    shards with the same dropout masks and sum the same two terms."""
    train(cfg(data_dir, tmp_path, **DROPOUT, workers=2), progress=False)
    assert step_losses(tmp_path) == step_losses(two_ranks_dropout)
    assert max_diff(saved(tmp_path)[0], saved(two_ranks_dropout)[0]) == 0.0


# ----------------------------------------------------------------------- resume

def test_resume_under_two_ranks_is_exact(mpiexec, data_dir, tmp_path, two_ranks_dropout):
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path, **{**DROPOUT, "max_iters": 5})))
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path, **DROPOUT, resume=True)))
    assert step_losses(tmp_path) == step_losses(two_ranks_dropout)
    (a, _, ma), (b, _, mb) = saved(tmp_path), saved(two_ranks_dropout)
    assert max_diff(a, b) == 0.0 and max_diff(ma, mb) == 0.0


def test_two_ranks_resume_in_one_process(mpiexec, data_dir, tmp_path, two_ranks, two_ranks_dropout, capfd):
    # same shards (2 ranks -> 2 threads): bit for bit, dropout included
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path / "a", **{**DROPOUT, "max_iters": 5})))
    capfd.readouterr()
    train(cfg(data_dir, tmp_path / "a", **DROPOUT, resume=True, workers=2), progress=False)
    same_shards_said = capfd.readouterr().err
    assert step_losses(tmp_path / "a") == step_losses(two_ranks_dropout)
    assert max_diff(saved(tmp_path / "a")[0], saved(two_ranks_dropout)[0]) == 0.0
    # one thread: the same global batches, the sums in another order (float64: 1e-12)
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path / "b", max_iters=10)))
    train(cfg(data_dir, tmp_path / "b", resume=True), progress=False)
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("numgpt: resuming a run")]
    diff = max_diff(saved(tmp_path / "b")[0], saved(two_ranks)[0])
    expected_line = ("numgpt: resuming a run trained as 2 shards (2 ranks x 1 worker) as 1 shard "
                     "(1 rank x 1 worker): the same global batches and schedule, the gradient sums "
                     "in another order (equal up to float rounding), so it does not repeat the run "
                     "bit for bit; 2 shards (ranks x workers) would")
    fault_row("20.9 MPI: a run of 2 ranks resumed as 1 process (1 worker), and as 2 workers",
              f"1 worker: {'one line says what differs' if said == [expected_line] else f'said {said}'}, "
              f"weights within {diff:.1e} of the straight run (float64); 2 workers: "
              f"{'no line' if 'numgpt: resuming a run' not in same_shards_said else 'a line'}, bit for bit",
              "another shard count (ranks x workers) is said in one line at resume (not bit for "
              "bit; equal up to float rounding); the same count resumes exactly without a word",
              said == [expected_line] and diff < 1e-12 and "numgpt: resuming a run" not in same_shards_said)


def test_sigterm_to_mpiexec_saves_once_and_resumes_exactly(mpiexec, data_dir, tmp_path):
    run = {"dtype": "float32", "dropout": 0.1, "lr_decay_iters": 1000, "checkpoint_interval": 0,
           "eval_interval": 0}
    config = cfg(data_dir, tmp_path / "b", **run, max_iters=100_000)
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "numgpt", "train", "--quiet", *_flags(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    log = tmp_path / "b" / "log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and len(step_losses(tmp_path / "b")) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.count("numgpt: saved") == 1, err  # rank 0 alone saved, once
    stopped = saved(tmp_path / "b")[1]["step"]
    assert stopped >= 3 and len(step_losses(tmp_path / "b")) == stopped
    total = stopped + 3
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path / "b", **run, max_iters=total, resume=True)))
    # the straight reference: 1 process x 2 threads runs the same 2 shards bit for bit
    train(cfg(data_dir, tmp_path / "a", **run, max_iters=total, workers=2), progress=False)
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")
    assert max_diff(saved(tmp_path / "b")[0], saved(tmp_path / "a")[0]) == 0.0


# ----------------------------------------------------------------------- faults

def test_a_killed_rank_ends_the_job_and_leaves_a_resumable_checkpoint(mpiexec, data_dir, tmp_path, two_ranks):
    import re

    proc = mpi_driver(mpiexec, tmp_path, "kill", 1, 7, cfg(data_dir, tmp_path / "run"), timeout=60)
    assert proc.returncode != 0
    # rank 0 named every rank's PID at the start; mpich's message names the dead one's PID
    pid = re.search(r"rank 1 pid (\d+) on ", proc.stderr).group(1)
    assert f"PID {pid} " in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    weights, meta, _ = saved(tmp_path / "run")  # the checkpoint of step 5 is intact
    assert meta["step"] == 5
    ok(mpi_train(mpiexec, cfg(data_dir, tmp_path / "run", resume=True)))
    assert max_diff(saved(tmp_path / "run")[0], saved(two_ranks)[0]) == 0.0
    assert step_losses(tmp_path / "run") == step_losses(two_ranks)


def test_a_hung_rank_is_named_and_the_others_stop(mpiexec, data_dir, tmp_path):
    proc = mpi_driver(mpiexec, tmp_path, "stop", 1, 7, cfg(data_dir, tmp_path / "run", rank_timeout=2),
                      timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("numgpt: rank 0:")]
    assert len(lines) == 1 and "rank 1 did not answer" in lines[0], proc.stderr[-2000:]
    assert "--resume" in lines[0]
    assert saved(tmp_path / "run")[1]["step"] == 5


# Rank 0 names a hung rank 1 and aborts while mpiexec's proxy (which reads rank 0's stderr
# and forwards it to mpiexec) is stopped for a second: a launcher that reads late. mpiexec
# exits as soon as the abort reaches it, so a line still in the pipe then is lost; the
# driver records how many bytes of stderr nobody had read when the abort went out.
LATE_READER = r'''
import array, fcntl, os, signal, subprocess, sys, termios
import numgpt.train.parallel as parallel

mode, report = sys.argv[1], sys.argv[2]
if mode == "print-only":  # the code before the fix: print the line, abort at once
    parallel._say = lambda line, patience=5.0: print(line, file=sys.stderr, flush=True)
ranks = parallel.MPIRanks(timeout=1)
comm = ranks.comm

class RecordingComm:
    def __getattr__(self, name):
        return getattr(comm, name)
    def Abort(self, code):
        unread = array.array("i", [0])
        fcntl.ioctl(2, termios.FIONREAD, unread)
        with open(report, "w") as f:
            f.write(str(unread[0]))
        comm.Abort(code)

ranks.comm = RecordingComm()
comm.Barrier()
if ranks.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # hangs
else:
    proxy = os.getppid()
    with open(f"/proc/{proxy}/comm") as f:
        if f.read().strip() != "hydra_pmi_proxy":
            with open(report, "w") as out:
                out.write("no proxy")
            comm.Abort(4)
    os.kill(proxy, signal.SIGSTOP)
    subprocess.Popen(["sh", "-c", f"sleep 1; kill -CONT {proxy}"])
    ranks.abort("rank 1 did not answer")
'''


def late_reader(mpiexec, tmp_path, mode: str) -> tuple[subprocess.CompletedProcess, str]:
    script, report = tmp_path / "late.py", tmp_path / f"unread-{mode}"
    script.write_text(LATE_READER)
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), mode, str(report)],
                          capture_output=True, text=True, timeout=60, env=_env())
    unread = report.read_text() if report.exists() else "no report"
    if unread == "no proxy":
        pytest.skip("this mpiexec starts ranks without MPICH's hydra proxy; the test stops that proxy")
    return proc, unread


def test_the_abort_line_is_out_before_the_job_ends_when_the_launcher_reads_late(mpiexec, tmp_path):
    """Issue 20 group 11: the hung-rank line vanished in 6 of 11 runs on an Intel Xeon because
    MPI_Abort reached mpiexec before its proxy had read the line from rank 0's stderr."""
    proc, unread = late_reader(mpiexec, tmp_path, "wait")
    assert proc.returncode != 0
    assert unread == "0", unread  # every byte of stderr was read before the abort
    lines = [line for line in proc.stderr.splitlines() if line.startswith("numgpt: rank 0:")]
    assert lines == ["numgpt: rank 0: rank 1 did not answer; stopping every rank."], proc.stderr
    # negative control, the code before the fix: the line is still unread when the abort goes
    proc, unread = late_reader(mpiexec, tmp_path, "print-only")
    assert proc.returncode != 0 and int(unread) > 0, (unread, proc.stderr)


def test_waiting_for_stderr_to_be_read_is_bounded():
    from numgpt.train.parallel import _wait_until_read

    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"numgpt: rank 0: ...\n")
        t0 = time.monotonic()
        assert _wait_until_read(write_end, 0.2) is False  # nobody reads: gives up, no hang
        assert 0.2 <= time.monotonic() - t0 < 5
        os.read(read_end, 100)
        assert _wait_until_read(write_end, 0.2) is True  # read: returns at once
    finally:
        os.close(read_end)
        os.close(write_end)
    not_a_pipe = os.open(os.devnull, os.O_WRONLY)
    try:
        assert _wait_until_read(not_a_pipe, 0.1) is True
    finally:
        os.close(not_a_pipe)


def test_ranks_launched_with_different_configs_are_refused(mpiexec, data_dir, tmp_path):
    base = [sys.executable, "-m", "numgpt", "train", "--quiet", *_flags(cfg(data_dir, tmp_path))]
    cmd = [mpiexec, "-n", "1", *base, "--seed", "1", ":", "-n", "1", *base, "--seed", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode != 0
    assert "rank 1 was launched differently from rank 0 (config.seed, " in proc.stderr
    assert not (tmp_path / "latest.json").exists() and not (tmp_path / "log.jsonl").exists()


def test_a_setup_error_on_one_rank_stops_every_rank(mpiexec, data_dir, tmp_path):
    base = [sys.executable, "-m", "numgpt", "train", "--quiet", *_flags(cfg(data_dir, tmp_path))]
    cmd = [mpiexec, "-n", "1", *base, ":", "-n", "1", *base, "--data", str(tmp_path / "missing")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2  # both ranks stop with the error, none waits for the other
    assert "rank 1 could not set up training" in proc.stderr, proc.stderr[-2000:]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(mpiexec, data_dir, tmp_path):
    proc = mpi_train(mpiexec, cfg(data_dir, tmp_path, batch_size=3))
    assert proc.returncode == 2
    assert "batch_size 3 does not split evenly over 2 ranks" in proc.stderr
    assert proc.stderr.count("numgpt: error:") == 1, proc.stderr  # rank 0 alone says it


def test_a_refused_config_is_printed_once_not_once_per_rank(mpiexec, data_dir, tmp_path):
    """Issue 21 group 12: every rank parses the same flags and refused them, each printing it."""
    proc = mpi_train(mpiexec, cfg(data_dir, tmp_path, max_iters=-1))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("numgpt: error:")]
    assert errors == ["numgpt: error: the configuration: config key 'max_iters' must be >= 0"], proc.stderr
    # a setup error on one rank alone: rank 0 names it once, the rank that hit it stays silent
    base = [sys.executable, "-m", "numgpt", "train", "--quiet", *_flags(cfg(data_dir, tmp_path / "b"))]
    cmd = [mpiexec, "-n", "1", *base, ":", "-n", "1", *base, "--data", str(tmp_path / "missing")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("numgpt: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "rank 1 could not" in errors[0], proc.stderr


def test_a_rank_that_hangs_before_the_first_checkpoint_gets_advice_that_works(mpiexec, data_dir, tmp_path):
    """Issue 20 group 9: the line said "continue with --resume", which then said "train
    without --resume first", which said "pass --resume"."""
    run = cfg(data_dir, tmp_path / "run", rank_timeout=2)
    proc = mpi_driver(mpiexec, tmp_path, "stop", 1, 2, run, timeout=60)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("numgpt: rank 0:")), "")
    first = "No checkpoint was saved yet: start over with --overwrite" in line and "--resume" not in line
    resumed = mpi_train(mpiexec, {**run, "resume": True})
    second = (resumed.returncode == 2 and resumed.stderr.count("numgpt: error:") == 1 and
              "stopped before its first checkpoint (there is no latest.json); start it over with "
              "--overwrite" in resumed.stderr)
    again = mpi_train(mpiexec, {**run, "overwrite": True})
    fault_row("20.9 MPI: a rank hangs before the first checkpoint; the advice is followed",
              f"rank 0: {line[len('numgpt: rank 0: '):][-80:]!r}; --resume: exit {resumed.returncode}, "
              f"{'start over with --overwrite' if second else resumed.stderr[-200:]!r}; --overwrite: "
              f"exit {again.returncode}",
              "every message gives the same advice (--overwrite: there is nothing to resume) and "
              "following it trains the run", first and second and again.returncode == 0)
    assert saved(tmp_path / "run")[1]["step"] == 20


# ----------------------------------------------------------------------- without MPI

def test_launched_ranks_reads_the_launchers_environment():
    from numgpt.train.launch import launched_rank, launched_ranks

    assert launched_ranks({}) == 1
    assert launched_ranks({"PMI_SIZE": "1"}) == 1
    assert launched_ranks({"PMI_SIZE": "4"}) == 4
    assert launched_ranks({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launched_rank({}) == 0 and launched_rank({"PMI_RANK": "1"}) == 1


def test_several_processes_without_mpi4py_say_how_to_install_it(monkeypatch):
    from numgpt.errors import ConfigError
    from numgpt.train.parallel import Ranks, ranks_from_environment

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(ConfigError, match=r"mpi4py is not installed.*pip install 'numgpt\[mpi\]'"):
        ranks_from_environment(10)
    monkeypatch.delenv("PMI_SIZE")
    ranks = ranks_from_environment(10)  # one process: no MPI needed
    assert type(ranks) is Ranks and ranks.size == 1
