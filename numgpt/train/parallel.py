"""Data parallelism: worker threads inside a process, MPI ranks across processes, and the
one path that sums their gradients.

The global batch of a step is ``gradient_accumulation_steps`` micro-batches of
``batch_size`` rows. Every rank draws the same global batch from the shared seed; rank
``r`` of ``N`` takes the ``r``-th contiguous chunk of ``batch_size / N`` rows of every
micro-batch, and its ``W`` worker threads split that chunk again (``_split``). So the run
is cut into ``S = N * W`` shards, shard ``s = r * W + w``, and which rows a shard sees
depends only on the step and ``s``. Each shard's loss is scaled by its share of the counted
targets (its rows' share, unless a loss mask ignores some targets) over the micro-batches, so
the summed gradient is that of the global mean loss.

The reduction (``DataParallel.backward``): each worker adds its gradients into its own dict;
the dicts are summed in worker order into ONE contiguous buffer (the optimizer's flat
gradient buffer when it has one, ``AdamW(kernels="fast")``, else our own); ``Ranks.sum``
adds that buffer over the ranks with ONE allreduce (nothing to do in one process); the
parameters' ``.grad`` are views of it. Every rank then applies the same AdamW update to the
same numbers, so the weights stay identical on every rank.

Dropout: one generator per (shard, micro-batch), seeded from the dropout generator in a
fixed order (every rank draws the whole ``(S, micro-batches)`` seed table and uses its own
rows), so masks depend neither on thread timing nor on which process runs a shard. With
one shard the dropout generator is used directly. Consequences, tested in tests/test_mpi.py:
2 ranks x 1 worker equals 1 process x 2 workers bit for bit (same shards, same masks, the
same two-term sums); N ranks without dropout equal one process up to float rounding of the
sum order (float64: 1e-12 after 20 steps).

``Ranks`` is the process group: size 1 without MPI (every collective is the identity), or
``MPIRanks`` over ``mpi4py`` when ``mpiexec`` started more than one process. Its collectives
are nonblocking requests polled against a deadline (``rank_timeout``): a rank that died or
hangs is detected, the others are pinged, the silent ones are named in a one-line message
and the job is aborted (the last complete checkpoint on disk stays as it was). That line is
out before the abort (``_say``): mpiexec exits as soon as it gets the abort, and a line still
in the pipe to its proxy would be lost with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
import weakref
from typing import Callable

import numpy as np

from ..errors import ConfigError, NumGPTError
from .launch import MPI_INSTALL_HINT, launched_ranks

__all__ = ["DataParallel", "Ranks", "MPIRanks", "ranks_from_environment", "check_split",
           "rank_rows", "fingerprint", "on_every_rank"]

# ------------------------------------------------------------------------- process groups

class Ranks:
    """One process: rank 0 of 1. Every collective returns its input; ``MPIRanks`` overrides
    them. ``rank_timeout`` is unused here (nothing to wait for)."""

    rank, size = 0, 1
    out_hint = ""  # appended to a fault message: where the last complete checkpoint is

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def sum(self, buffer: np.ndarray, what: str) -> None:
        """Add ``buffer`` (contiguous) over all ranks, in place; ``what`` names it in messages."""

    def any(self, flag: bool, what: str) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        return bool(flag)

    def allgather(self, value, what: str) -> list:
        """``[value of rank 0, value of rank 1, ...]`` on every rank (JSON-able values)."""
        return [value]

    def abort(self, reason: str) -> None:
        """Stop every rank at once (a failure only this rank saw); nothing to do in one process."""

    def agree(self, setup: Callable[[], object], what: str):
        """Run ``setup`` on every rank; if it raised on any rank, raise on all of them (the
        failing rank its own error, the others a ConfigError naming it), so no rank is left
        waiting for a collective its peers never call."""
        return setup()


class MPIRanks(Ranks):
    """The ranks of ``MPI.COMM_WORLD``. Collectives are nonblocking requests polled until
    done; past ``timeout`` seconds without completion the silent ranks are found by a ping
    round and named, and the job is aborted (``MPI_Abort``)."""

    _PING, _PONG = 7001, 7002

    def __init__(self, timeout: float):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(timeout)
        self._sent: list = []  # pending small sends (pongs, pings), kept alive until done

    # -------------------------------------------------------------- collectives
    def sum(self, buffer: np.ndarray, what: str) -> None:
        if not buffer.flags.c_contiguous:
            raise ValueError("Ranks.sum needs a contiguous buffer")
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM), what)

    def any(self, flag: bool, what: str) -> bool:
        box = np.array([1.0 if flag else 0.0])
        self.sum(box, what)
        return bool(box[0] > 0)

    def allgather(self, value, what: str) -> list:
        payload = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        sizes[self.rank] = payload.size
        self.sum(sizes, what)
        gathered = np.empty(int(sizes.sum()), dtype=np.uint8)
        counts, offsets = sizes.tolist(), np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()
        self._wait(self.comm.Iallgatherv(payload, [gathered, counts, offsets, self.MPI.BYTE]), what)
        return [json.loads(gathered[o:o + c].tobytes().decode("utf-8"))
                for o, c in zip(offsets, counts)]

    def abort(self, reason: str) -> None:
        _say(f"numgpt: rank {self.rank}: {reason}; stopping every rank.{self.out_hint}")
        self.comm.Abort(1)

    def agree(self, setup: Callable[[], object], what: str):
        try:
            value, error = setup(), None
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            value, error = None, e
        described = None if error is None else (
            str(error) if isinstance(error, NumGPTError) else f"{type(error).__name__}: {error}")
        failures = self.allgather(described, what)
        if error is not None:
            raise on_every_rank(error)
        for rank, message in enumerate(failures):
            if message is not None:
                raise on_every_rank(ConfigError(f"rank {rank} could not {what}: {message}"))
        return value

    # -------------------------------------------------------------- the watchdog
    def _wait(self, request, what: str) -> None:
        """Poll ``request`` until done. Spin for the first 50 ms (MPI makes progress only
        inside these calls), then sleep between polls and answer peers' pings; after
        ``timeout`` seconds ping every rank and abort naming the silent ones."""
        start = time.perf_counter()
        spins = 0
        while not request.Test():
            spins += 1
            if spins < 2000:
                continue
            waited = time.perf_counter() - start
            if waited < 0.05:
                continue
            self._answer_pings()
            if waited > self.timeout:
                self._give_up(request, what)
                return
            time.sleep(0.001)

    def _answer_pings(self) -> None:
        self._sent = [r for r in self._sent if not r.Test()]  # forget delivered ones
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self._PING):
            status = self.MPI.Status()
            self.comm.recv(source=self.MPI.ANY_SOURCE, tag=self._PING, status=status)
            self._sent.append(self.comm.isend(self.rank, dest=status.Get_source(), tag=self._PONG))

    def _give_up(self, request, what: str, grace: float = 5.0) -> None:
        """Ping every other rank; those that do not answer within ``grace`` seconds are
        named. If the collective completes meanwhile, carry on."""
        peers = [r for r in range(self.size) if r != self.rank]
        self._sent += [self.comm.isend(self.rank, dest=r, tag=self._PING) for r in peers]
        pongs = {r: self.comm.irecv(source=r, tag=self._PONG) for r in peers}
        answered: set[int] = set()
        deadline = time.perf_counter() + grace
        while time.perf_counter() < deadline and len(answered) < len(peers):
            if request.Test():
                return
            self._answer_pings()
            answered |= {r for r, req in pongs.items() if r not in answered and req.Test()}
            time.sleep(0.01)
        silent = [r for r in peers if r not in answered]
        who = (f"rank {', '.join(map(str, silent))} did not answer" if silent else
               "every rank answers but the collective did not complete")
        _say(f"numgpt: rank {self.rank}: {who} within {self.timeout:g} s of waiting for "
             f"{what} (died or hung); stopping every rank.{self.out_hint}")
        self.comm.Abort(3)


def _say(line: str, patience: float = 5.0) -> None:
    """Print ``line`` on stderr and return once whoever reads stderr has read it (at most
    ``patience`` seconds), so that an ``MPI_Abort`` right after cannot lose it.

    Under mpiexec (MPICH's hydra) a rank's stderr is a pipe to the launcher's proxy, which
    forwards what it reads to mpiexec; the abort travels on another socket, and mpiexec kills
    the job and exits as soon as it gets it. When the proxy handles the abort before it has
    read the pipe, the line is lost: the hung-rank message vanished in 6 of 11 runs on an
    Intel Xeon, and here in 6 of 40 with the proxy made to read late. Once the pipe is empty
    the proxy has forwarded the line (it reads and forwards in one step, before it looks at
    the abort). stderr that is not a pipe (a file, a terminal) needs no wait."""
    print(line, file=sys.stderr, flush=True)
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by a non-file object (tests)
        return
    _wait_until_read(fd, patience)


def _wait_until_read(fd: int, patience: float) -> bool:
    """Wait until the pipe ``fd`` writes to holds no unread bytes (FIONREAD); True when it
    emptied within ``patience`` seconds or is not a pipe, False when no one read it in time."""
    try:
        import array
        import fcntl
        import termios

        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return True
        unread = array.array("i", [0])
        deadline = time.monotonic() + patience
        while True:
            fcntl.ioctl(fd, termios.FIONREAD, unread)
            if unread[0] == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
    except (ImportError, OSError):  # no FIONREAD on this system: nothing to wait on
        return True


def on_every_rank(error: BaseException) -> BaseException:
    """Mark ``error`` as raised on every rank at once, rank 0 naming it too (a failed
    ``agree``, a refused launch, a diverged step): the CLI prints such an error on rank 0
    alone, not once per rank."""
    error.every_rank = True
    return error


def ranks_from_environment(timeout: float) -> Ranks:
    """``MPIRanks`` when ``mpiexec`` started more than one process, else ``Ranks()``. Asking
    for several processes without ``mpi4py`` is a ``ConfigError`` saying how to install it."""
    launched = launched_ranks()
    if launched == 1:
        return Ranks()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise ConfigError(f"numgpt train was started as {launched} processes (mpiexec -n "
                          f"{launched}) but mpi4py is not installed, so they cannot cooperate; "
                          f"{MPI_INSTALL_HINT}, or run one process without mpiexec") from None
    return MPIRanks(timeout)


def fingerprint(arrays) -> str:
    """A short hash of the bytes of ``arrays`` (to compare weights or data across ranks)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).ravel())
    return h.hexdigest()


# ------------------------------------------------------------------------- the shards

def check_split(batch_size: int, workers: int, ranks: int) -> None:
    """Every rank must get the same rows: ``batch_size`` a multiple of ``ranks``, and each
    rank's rows at least one per worker thread; ConfigError naming the numbers."""
    if batch_size % ranks:
        raise ConfigError(f"batch_size {batch_size} does not split evenly over {ranks} ranks "
                          f"(each rank takes batch_size / {ranks} rows of every micro-batch); "
                          f"choose a batch_size that is a multiple of {ranks} (e.g. "
                          f"{(batch_size // ranks + 1) * ranks}) or a number of ranks that divides it")
    if workers > batch_size // ranks:
        raise ConfigError(f"workers {workers} exceed the {batch_size // ranks} rows each of "
                          f"{ranks} ranks takes of a batch_size {batch_size} micro-batch; "
                          f"lower workers or raise batch_size")


def rank_rows(rows: int, rank: int, ranks: int) -> slice:
    """Rank ``rank``'s contiguous chunk of ``rows`` rows (``rows`` a multiple of ``ranks``)."""
    share = rows // ranks
    return slice(rank * share, (rank + 1) * share)


def _split(batches, workers: int) -> list[list[tuple]]:
    """Worker w's ``(x, y, scale)`` slices: the w-th contiguous chunk of rows of every
    ``(x, y, targets)`` piece (this rank's rows of a micro-batch that holds ``targets``
    counted targets), its loss scaled by (counted targets in the chunk / ``targets``) /
    number of micro-batches. A chunk's loss is the mean over its counted targets, so the
    scaled sum is the micro-batch's mean loss even when a loss mask (targets -1, chat data)
    leaves the chunks different counts; without one this is the chunk's share of the rows,
    the same number (a / b == (a * T) / (b * T) in floating point: one rounding of one ratio)."""
    out: list[list[tuple]] = [[] for _ in range(workers)]
    for x, y, of_targets in batches:
        for w, rows in enumerate(np.array_split(np.arange(len(x)), workers)):
            counted = _counted(y[rows])
            out[w].append((x[rows], y[rows],
                           counted / of_targets / len(batches) if of_targets else 0.0))
    return out


def _counted(y: np.ndarray) -> int:
    """Targets that carry loss (not the ignore index -1)."""
    return int(np.count_nonzero(np.asarray(y) != -1))


class _FlatGradients:
    """One contiguous gradient buffer with a view per parameter, for optimizers that do not
    keep one (``AdamW(kernels="reference")``)."""

    def __init__(self, params: dict):
        dtypes = {p.data.dtype for p in params.values()}
        dtype = np.result_type(*dtypes)
        sizes = [p.data.size for p in params.values()]
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.grad = np.zeros(int(offsets[-1]), dtype)
        self.views = {n: self.grad[lo:hi].reshape(p.data.shape)
                      for (n, p), lo, hi in zip(params.items(), offsets[:-1], offsets[1:])}


# ------------------------------------------------------------------------- the reduction

class DataParallel:
    """``workers`` threads in this process times the ``ranks`` processes of the run, each
    thread running forward and backward on one shard of every micro-batch; see the module
    docstring for the shards and the one reduction path. Use with single-threaded BLAS
    (``--threads 1``) when ``workers > 1``: the parallelism is here instead of inside each
    matrix product, and it also covers the element-wise work BLAS threads leave on one core.
    """

    def __init__(self, workers: int, ranks: Ranks | None = None):
        if not (isinstance(workers, int) and workers >= 1):
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers = workers
        self.ranks = ranks if ranks is not None else Ranks()
        self.pool = None
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="numgpt-train")
        self.reduce_seconds = 0.0  # time spent in the gradient allreduce (benchmarks read it)

    @property
    def shards(self) -> int:
        return self.workers * self.ranks.size

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __enter__(self) -> "DataParallel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- one step
    def local_slices(self, batches) -> list[list[tuple]]:
        """This rank's workers' ``(x, y, scale)`` slices of the global micro-batches."""
        rows = rank_rows(len(batches[0][0]), self.ranks.rank, self.ranks.size)
        return _split([(x[rows], y[rows], _counted(y)) for x, y in batches], self.workers)

    def dropout_rngs(self, rng, micro_batches: int) -> list[list]:
        """Per (local worker, micro-batch) dropout generator; see the module docstring."""
        if rng is None:
            return [[None] * micro_batches for _ in range(self.workers)]
        if self.shards == 1:
            return [[rng] * micro_batches]
        seeds = rng.integers(0, 2**63, size=(self.shards, micro_batches))  # (S, micro-batches)
        mine = seeds[self.ranks.rank * self.workers:(self.ranks.rank + 1) * self.workers]
        return [[np.random.default_rng(int(v)) for v in row] for row in mine]

    def backward(self, run_slices: Callable, optimizer, batches, rng, what: str) -> float:
        """Forward/backward of this rank's shards (``run_slices(slices, rngs) -> (loss,
        grads dict)`` per worker), gradients summed over workers then ranks into one flat
        buffer, ``.grad`` of every parameter a view of it. Returns the global mean loss
        (summed over ranks before the gradients, so every rank sees a NaN at once)."""
        slices = self.local_slices(batches)
        rngs = self.dropout_rngs(rng, len(batches))
        if self.pool is None:
            results = [run_slices(slices[0], rngs[0])]
        else:
            futures = [self.pool.submit(run_slices, s, r) for s, r in zip(slices, rngs)]
            results = [f.result() for f in futures]
        loss = np.array([sum(value for value, _ in results)])
        self.ranks.sum(loss, f"the loss of {what}")
        params = optimizer.params
        buffer, views = self._buffer(optimizer)
        touched = {p for _, into in results for p in into}  # the same on every rank
        for name, p in params.items():
            view = views[name]
            grads = [into[p] for _, into in results if p in into]
            if not grads:
                view[...] = 0.0
                continue
            np.copyto(view, grads[0])
            for g in grads[1:]:  # worker order: deterministic
                view += g
        t0 = time.perf_counter()
        self.ranks.sum(buffer, f"the gradients of {what}")
        self.reduce_seconds += time.perf_counter() - t0
        for name, p in params.items():
            p.grad = views[name] if p in touched else None
        return float(loss[0])

    @staticmethod
    def _buffer(optimizer) -> tuple[np.ndarray, dict]:
        """The contiguous gradient buffer: the optimizer's own (fast AdamW) or one of ours,
        made once per optimizer (so a step allocates none)."""
        flat = getattr(optimizer, "flat", None)
        if flat is not None and getattr(flat, "grad", None) is not None:
            return flat.grad, flat.grad_views
        mine = _GRADIENT_BUFFERS.get(optimizer)
        if mine is None:
            mine = _GRADIENT_BUFFERS[optimizer] = _FlatGradients(optimizer.params)
        return mine.grad, mine.views


# optimizer -> its _FlatGradients; an entry goes when its optimizer is freed
_GRADIENT_BUFFERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
