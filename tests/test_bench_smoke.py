"""The kernel benchmarks still run and their equality checks still pass (timing disabled: one call each)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_kernel_benchmarks_run_and_check_their_results():
    pytest.importorskip("pytest_benchmark")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "test_bench_kernels.py", "-q", "-p", "no:cacheprovider",
         "--benchmark-disable", "-k", "V30522 and not datasets"],
        cwd=BENCH, capture_output=True, text=True, timeout=600,
        # Benchmark shapes are real-sized: the interpreter (which the test session turns on) would take minutes.
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
