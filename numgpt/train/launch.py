"""How many processes ``mpiexec`` started, read from the environment without loading NumPy
or MPI (the CLI asks before it sets the BLAS thread count; ``train.parallel`` builds on it)."""

from __future__ import annotations

import os

__all__ = ["launched_ranks", "launched_rank", "MPI_INSTALL_HINT"]

MPI_INSTALL_HINT = "pip install 'numgpt[mpi]' (mpi4py and the self-contained mpich wheel)"

# Environment variables the common launchers set to the number of processes started
# (MPICH/Hydra, Open MPI, PMIx).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launched_ranks(environ=None) -> int:
    """How many processes ``mpiexec`` started, from the variables it sets (1 outside it)."""
    environ = os.environ if environ is None else environ
    for name in _SIZE_VARS:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def launched_rank(environ=None) -> int:
    """This process's rank among those ``mpiexec`` started (0 outside it)."""
    environ = os.environ if environ is None else environ
    for name in _RANK_VARS:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0
