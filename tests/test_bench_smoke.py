"""The benchmarks still run and their equality checks still pass: the GPU parts as a dry run, the head + loss."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark scripts in subprocesses (~90 s): `make test-all`

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_parts_dry_run_on_cpu_with_their_checks(tmp_path):
    """`scripts/gpu.sh all --dry-run`: every GPU part runs on the CPU with tiny shapes (the kernels under the
    interpreter), on real BBC News ids prepared by bench/prepare_ids.py, and writes its results; no case FAILED
    (each provider's result was checked against the reference before it was timed)."""
    import json

    ids_dir, out = tmp_path / "ids", tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PEMA_IDS_DIR": str(ids_dir)}
    prepare = subprocess.run([sys.executable, str(BENCH / "prepare_ids.py"), "--tokenizers", "bert (MiniLM)",
                              "--out", str(ids_dir)], capture_output=True, text=True, timeout=300, env=env)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    result = subprocess.run(["bash", str(BENCH.parent / "scripts" / "gpu.sh"), "all", "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=env | {"PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    for name in ("environment.json", "kernels.json", "kernels.md", "scan.json", "scan.md", "head.json", "head.md",
                 "memory_cpu.json", "memory_cpu.md", "tests.md"):
        assert (out / name).stat().st_size > 0, name
    for part, ops in (("kernels", {"lookup", "backward"}), ("scan", {"scan"})):
        rows = json.loads((out / f"{part}.json").read_text())["rows"]
        assert {r["op"] for r in rows} == ops and {r["status"] for r in rows} <= {"ok", "unavailable"}
        assert {r["ids"] for r in rows if r["status"] == "ok"} == {"bert (MiniLM)", "zipf"}  # real text ran
        assert all(r["median_s"] > 0 and r["worst_s"] >= r["median_s"] for r in rows if r["status"] == "ok")


def test_first_hour_dry_run_on_cpu_writes_a_status_line_for_every_sub_part(tmp_path):
    """`scripts/gpu.sh first-hour --dry-run`: the short-window command runs end to end on the CPU without bench/.ids
    (synthetic ids: nothing crashes for lack of them), and first-hour.md gives every sub-part a status line."""
    import json
    import re

    out = tmp_path / "fh"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "PEMA_IDS_DIR": str(tmp_path / "no-ids"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(BENCH.parent / "scripts" / "gpu.sh"), "first-hour", "--dry-run", "--out",
                             str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = (out / "first-hour.md").read_text()
    for name, _, _ in _bench_module("first_hour").PLAN:
        assert re.search(rf"^\| {name} \| (ok|noted)\b", summary, re.M), f"{name}:\n{summary}"
    for section in ("## Fused loss", "## Lookup and backward", "## Scan", "## Skipped"):
        assert section in summary
    for name in ("environment.json", "first-hour.json", "head.json", "kernels.json", "scan.json", "tests.xml"):
        assert (out / name).stat().st_size > 0, name
    head = json.loads((out / "head.json").read_text())
    assert {r["provider"] for r in head["rows"] if "median_s" in r} >= {"fused frozen", "unfused frozen", "restricted"}
    assert any("synthetic" in note for note in head["notes"])
    assert json.loads((out / "environment.json").read_text())["first_hour_budget_s"] == 540


def test_first_hour_a_crashing_sub_part_is_a_failed_line_and_the_next_one_still_runs(tmp_path, monkeypatch):
    first_hour = _bench_module("first_hour")
    ran = []

    def crash(ctx, limit, budget):
        raise RuntimeError("boom")

    def fine(ctx, limit, budget):
        ran.append(budget)
        return {"status": "ok: 1 rows"}

    monkeypatch.setattr(first_hour, "PLAN", [("head", 20, 5), ("kernels", 20, 5)])
    monkeypatch.setattr(first_hour, "TOTAL_S", 40)
    monkeypatch.setattr(first_hour, "SUBPARTS", {"head": crash, "kernels": fine})
    assert first_hour.run(tmp_path, dry=True) == 1
    summary = (tmp_path / "first-hour.md").read_text()
    assert "| head | FAILED: RuntimeError: boom |" in summary and "| kernels | ok: 1 rows |" in summary
    assert ran and 30 < ran[0] <= 35  # 40 s less the kernels' 5 s of grace: the time head left goes on to them


def test_pytest_benchmark_front_end_runs_the_same_checked_cases(tmp_path):
    """bench/test_bench_kernels.py, the pytest-benchmark runs: every lookup, backward and scan provider of the CPU
    Zipf cases passes its result check, and the JSON holds each timer's median beside the byte floor."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path users get, full-sized
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "pytest", "test_bench_kernels.py", "-q", "-p", "no:cacheprovider",
                             "-k", "V30522-zipf or V128256-zipf-N", f"--benchmark-json={out}",
                             "--benchmark-min-rounds=1"],
                            cwd=BENCH, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert {b["extra_info"]["op"] for b in benchmarks} == {"lookup", "backward", "scan"}
    assert all(b["extra_info"]["timer_median_s"] > 0 and b["extra_info"]["floor_bytes"] > 0 for b in benchmarks)


def test_loss_benchmark_runs_each_provider_and_they_agree(tmp_path):
    """bench/linear_cross_entropy.py on a small case: every CPU provider runs, and the frozen ones give one loss."""
    import json

    import torch

    used_file = tmp_path / "used.pt"
    torch.save(torch.arange(0, 49152, 7), used_file)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    losses = {}
    for provider in ("unfused frozen", "fused frozen", "fused restricted", "restricted"):
        result = subprocess.run([sys.executable, str(BENCH / "linear_cross_entropy.py"), "--one", provider, "0", "64",
                                 str(used_file), "--rounds", "1"], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        row = json.loads(result.stdout.strip().splitlines()[-1])
        assert row["head_grad_shape"] == [len(range(0, 49152, 7)), 576] and row["peak_bytes"] > 0
        losses[provider] = row["loss"]
    assert abs(losses["fused frozen"] - losses["unfused frozen"]) < 1e-4
    assert abs(losses["fused restricted"] - losses["restricted"]) < 1e-4


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_a_failing_case_is_a_row_and_the_table_goes_on():
    import torch

    harness = _bench_module("harness")

    def wrong(out):
        raise AssertionError("differs from the reference")

    case = {"op": "lookup", "case": "c"}
    rows = [harness.measure(case | {"provider": "raises"}, lambda: (lambda: 1 / 0, None), floor_bytes=8, rounds=1),
            harness.measure(case | {"provider": "wrong"}, lambda: (lambda: torch.zeros(2), wrong), floor_bytes=8),
            harness.measure(case | {"provider": "right"}, lambda: (lambda: torch.zeros(2), lambda out: None),
                            floor_bytes=8, rounds=3)]
    assert [r["status"] for r in rows] == ["FAILED", "FAILED", "ok"]
    assert rows[0]["error"].startswith("ZeroDivisionError") and "differs" in rows[1]["error"]
    assert rows[2]["rounds"] == 3 and rows[2]["worst_s"] >= rows[2]["median_s"] > 0
    lines = harness.table(rows, {"copy_gbps_median": 1.0})
    assert len(lines) == 5 and "FAILED: ZeroDivisionError" in lines[2] and "| ok |" in lines[4]


def test_zipf_ids_follow_zipf_1_with_the_hot_ids_spread_over_the_vocabulary():
    import torch

    ids, used, _ = _bench_module("ids").zipf(10_000, 200_000, share=0.05)
    counts = torch.bincount(ids, minlength=10_000)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(used.tolist()) and len(used) == 500
    top = counts.sort(descending=True)
    harmonic = sum(1 / r for r in range(1, 501))
    # Zipf(1): rank r has probability 1 / (r H_U); ranks 1 and 10 within 10% of that at 200k draws.
    assert abs(top.values[0] / 200_000 * harmonic - 1) < 0.1 and abs(top.values[9] / 200_000 * harmonic * 10 - 1) < 0.1
    assert sorted(top.indices[:10].tolist()) != used[:10].tolist()  # the hot ids are not the lowest used ids
