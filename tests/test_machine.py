"""``benchmarks/machine.py``: the read-bandwidth ceiling every decode benchmark divides by.

The sweep must read every element exactly once (else its GB/s is fiction), and the check
that compares a decode's streaming rate with the ceiling must warn exactly when the decode
streams faster than the measured bandwidth (a decode cannot outrun memory, so then the
ceiling was measured too low) and stay quiet below it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine  # noqa: E402  (benchmarks/machine.py)


def test_the_sweep_reads_every_element_once_on_every_thread():
    # small integers: every partial sum is exact in float32, so any summation order gives
    # the total exactly, and an element read twice or skipped changes it
    x = np.arange(1, 1 + (3 << 18), dtype=np.float32) % 7
    want = float(x.astype(np.float64).sum())
    for threads in (1, 2, 3):
        chunks = [x[c * x.size // threads:(c + 1) * x.size // threads] for c in range(threads)]
        assert sum(float(machine._chunk_sum()(c)) for c in chunks) == want
    timer = machine.read_sweep(threads=2, x=np.ones(1 << 20, np.float32))
    assert timer() > 0
    assert machine.read_bandwidth(mib=4, repeats=2, threads=2) > 0


def test_a_decode_streaming_faster_than_the_ceiling_is_flagged_and_one_below_is_not():
    above = machine.check_streaming("124M numgpt", 498e6, 60.0, 25.0)  # 29.9 GB/s > 25
    below = machine.check_streaming("124M numgpt", 498e6, 40.0, 25.0)  # 19.9 GB/s < 25
    assert above.startswith("WARNING") and "29.9 GB/s" in above and "under-measured" in above
    assert not below.startswith("WARNING") and "19.9 GB/s" in below and "80%" in below


def test_a_cpus_section_replaces_only_its_own_and_keeps_the_other_vendors(tmp_path):
    path = str(tmp_path / "bench.md")
    machine.write_cpu_section(path, "T", "intro", "AMD EPYC", "| a | 1 |")
    machine.write_cpu_section(path, "T", "intro", "Intel Xeon", "| b | 2 |")
    machine.write_cpu_section(path, "T", "intro", "AMD EPYC", "| a | 3 |")
    text = Path(path).read_text()
    assert text.startswith("# T\n\nintro\n\n## AMD EPYC\n")
    assert "| a | 3 |" in text and "| b | 2 |" in text  # the Xeon's row survived
    assert "| a | 1 |" not in text  # the EPYC's old row was replaced, not duplicated
    assert text.count("## ") == 2


def test_the_machine_line_names_the_gemm_library():
    """Every benchmark prints the library its products ran on (issue 19): the measured one,
    else what ``gemm_library()`` finds now (numgpt's choice, or NumPy's BLAS before it)."""
    line = machine.Machine("AMD EPYC", 2, 2, 190.0, 25.0, 0.5, 7.6, gemm="oneMKL 2025").describe()
    assert "CPU AMD EPYC" in line and "GEMM library oneMKL 2025;" in line
    found = machine.gemm_library()
    assert found and f"GEMM library {found};" in machine.Machine("X", 1, 1, 1.0, 1.0, 0.0).describe()
