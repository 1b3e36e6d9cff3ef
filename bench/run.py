"""Runs every benchmark that fits this machine and writes results under bench/results/.

    python bench/run.py            # kernels and scan (also as pytest-benchmark JSON), memory, head + loss,
                                   # vocabulary usage, trim, generation, peers, SFT under TRL
    python bench/run.py --only kernels

Kernels and scan (bench/kernel_cases.py, bench/scan_cases.py, timed by bench/harness.py): raw JSON and a markdown
table with, per case, each provider's median and worst time, its speed-up over the baseline measured in the same run,
and the GB/s of the case's byte floor next to a copy bandwidth measured in the same run. Each provider's result is
checked against the reference before it is timed; a failing case is a row marked FAILED, and the table is still
written. On a GPU, `scripts/gpu.sh PART` runs the same code in parts that each fit one command (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path[:0] = [str(BENCH.parent), str(BENCH)]


def run_kernels() -> bool:
    """The lookup, backward and scan tables of this device: kernels_<device>.{json,md}, scan_<device>.{json,md}."""
    import gpu
    import harness

    tag, budget = harness.device_slug(), harness.Budget(float("inf"))
    ok = gpu.part_kernels(RESULTS, budget, dry=False, stem=f"kernels_{tag}")
    return gpu.part_scan(RESULTS, budget, dry=False, stem=f"scan_{tag}") and ok


def run_pytest_benchmark() -> bool:
    """bench/test_bench_kernels.py under pytest-benchmark: kernels_<device>.benchmark.json, with its machine_info and
    commit_info (the same checked cases as run_kernels, timed by pytest-benchmark's rounds)."""
    import harness

    out = RESULTS / f"kernels_{harness.device_slug()}.benchmark.json"
    cmd = [sys.executable, "-m", "pytest", "test_bench_kernels.py", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out}"]
    return subprocess.run(cmd, cwd=BENCH).returncode == 0


def prepare_ids() -> None:
    """The real-text id streams the kernel cases read (bench/.ids, ignored by git), made once."""
    import ids

    missing = [key for key in ids.TOKENIZERS if not ids.prepared_path(key).exists()]
    if missing:
        subprocess.run([sys.executable, str(BENCH / "prepare_ids.py"), "--tokenizers", *missing], check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ["kernels", "memory", "linear_cross_entropy", "vocab", "trim", "generation", "peers", "trl_sft"]
    p.add_argument("--only", choices=parts, action="append")
    args = p.parse_args(argv)
    only = set(args.only or parts)
    RESULTS.mkdir(exist_ok=True)
    failed = []
    if "kernels" in only:
        prepare_ids()
        # pytest-benchmark first: its commit_info is only clean (dirty: false) before this run writes results.
        failed += [] if run_pytest_benchmark() else ["pytest-benchmark"]
        failed += [] if run_kernels() else ["kernels"]
    # Each script below reports its own failing cases in its table; a script that crashes stops nothing else.
    for name, script in (("memory", "memory.py"), ("linear_cross_entropy", "linear_cross_entropy.py"),
                         ("vocab", "vocab_usage.py"), ("trim", "trim.py"), ("generation", "generation.py"),
                         ("peers", "peers.py"), ("trl_sft", "trl_sft.py")):
        if name in only and subprocess.run([sys.executable, str(BENCH / script)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)} (see their tables)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
