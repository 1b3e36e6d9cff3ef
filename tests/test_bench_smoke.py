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


def test_loss_benchmark_runs_each_provider_and_they_agree(tmp_path):
    """bench/loss.py on a small case: every CPU provider runs, and the frozen ones give one loss."""
    import json

    import torch

    used_file = tmp_path / "used.pt"
    torch.save(torch.arange(0, 49152, 7), used_file)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    losses = {}
    for provider in ("unfused frozen", "fused frozen", "fused restricted", "restricted"):
        result = subprocess.run([sys.executable, str(BENCH / "loss.py"), "--one", provider, "0", "64", str(used_file),
                                 "--rounds", "1"], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        row = json.loads(result.stdout.strip().splitlines()[-1])
        assert row["head_grad_shape"] == [len(range(0, 49152, 7)), 576] and row["peak_bytes"] > 0
        losses[provider] = row["loss"]
    assert abs(losses["fused frozen"] - losses["unfused frozen"]) < 1e-4
    assert abs(losses["fused restricted"] - losses["restricted"]) < 1e-4
