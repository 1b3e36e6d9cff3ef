"""The GPU checks, one part per command: `scripts/gpu.sh PART` (or `make gpu PART=...`).

Parts (each one command of at most 8 minutes on an H100; a part stops adding cases when its time budget is spent
and lists the cases it skipped):
    tests    the kernel test files on CUDA (tests/test_lookup.py, test_scan.py, test_linear_cross_entropy.py,
             test_modules.py, test_id_check.py), then the other tests marked `gpu`
    kernels  lookup and backward (bench/kernel_cases.py)
    scan     the vocabulary scan at 10^8 ids (bench/scan_cases.py)
    head     the LM head + loss (bench/linear_cross_entropy.py, GPU shapes)
    memory   one training step's memory (bench/memory.py)
    all      every part in turn (longer than one 10-minute command: for a machine of your own)
    first-hour  for a short window: the cases that settle the design from head, kernels, scan and tests, in at most
             9 minutes in all (bench/first_hour.py). The one call of the device tool, with the anchors' wheels from
             `bash scripts/setup.sh` (.whl/gpu/) and the real-text ids (bench/.ids, optional) carried along:
                 command   bash scripts/gpu.sh first-hour --out "$OUT/first-hour"
                 carry     [".whl", "bench/.ids"]
                 timeout_s 600
             then copy what comes back to bench/results/gpu/<device>/first-hour/ and commit it.

Runs on a bare GPU image (torch, triton, transformers, pytest; no install of this package, no datasets, no
tokenizer packages): real-text ids come from bench/.ids, made beforehand by `python bench/prepare_ids.py` on a
machine that has the tokenizers, and carried along (without them: the real-text rows say "unavailable", the
Zipf rows run, and head and memory use synthetic used ids, said in their notes). Writes, per part, raw JSON and a
markdown table, and an environment file, under bench/results/gpu/<device>/ (or --out).

--dry-run (or PEMA_GPU_DRY_RUN=1): every part on the CPU with tiny shapes, the kernels under TRITON_INTERPRET=1,
into a temporary folder: CI runs it so that these scripts cannot rot. Its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTS = ["tests", "kernels", "scan", "head", "memory"]
# Seconds each part may spend on cases (start-up and the last case come on top): inside 8 minutes on an H100.
BUDGET_S = {"tests": 420, "kernels": 330, "scan": 240, "head": 360, "memory": 300}
KERNEL_TESTS = ["tests/test_lookup.py", "tests/test_scan.py", "tests/test_linear_cross_entropy.py",
                "tests/test_linear_log_probs.py", "tests/test_modules.py", "tests/test_id_check.py"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS + ["all", "first-hour"])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("PEMA_GPU_DRY_RUN") == "1")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/gpu/<device>/[first-hour/])")
    p.add_argument("--budget", type=float, help="seconds per part (default: each part's own); first-hour: in all")
    p.add_argument("--cases", action="append", metavar="REGEX",
                   help="kernels, scan: only the cases whose name matches one of these (repeatable), in their order")
    args = p.parse_args(argv)
    if args.dry_run:  # before torch and pema_triton are imported: the interpreter is chosen at import
        os.environ.update(PEMA_GPU_DRY_RUN="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    sys.path[:0] = [str(REPO), str(BENCH)]
    import harness

    out = args.out or (Path(tempfile.mkdtemp(prefix="pema-gpu-dry-run-")) if args.dry_run
                       else BENCH / "results" / "gpu" / harness.device_slug())
    if args.part == "first-hour":
        import first_hour

        return first_hour.run(out if args.out else out / "first-hour", args.dry_run, args.budget)
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(harness.environment(), indent=1) + "\n")
    failed = []
    for part in PARTS if args.part == "all" else [args.part]:
        start = time.monotonic()
        budget = harness.Budget(args.budget if args.budget is not None else (60 if args.dry_run else BUDGET_S[part]))
        print(f"== {part} (budget {budget.seconds:.0f} s) -> {out}", flush=True)
        cases = {"cases": args.cases} if part in ("kernels", "scan") else {}
        ok = globals()[f"part_{part}"](out, budget, args.dry_run, **cases)
        print(f"== {part}: {'done' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s", flush=True)
        failed += [] if ok else [part]
    print(f"results in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _copy(dry: bool) -> dict:
    import harness

    # 4 GiB on a GPU: 80x the H100's 50 MB L2, so the copy runs at HBM speed; 256 MiB on a CPU; 4 MiB dry.
    nbytes = 4 * 2**20 if dry else (4 * 2**30 if harness.ON_GPU else 256 * 2**20)
    return harness.copy_gbps(nbytes)


def _timed_part(name: str, module: str, out: Path, budget, dry: bool, notes: list[str], stem: str | None,
                cases: list[str] | None = None) -> bool:
    import harness

    copy = _copy(dry)
    module = __import__(module)
    _stop_on_sigint(budget)
    rows = module.run(budget, rounds=1 if dry else 5, cases=cases)  # dry: the sorted backward runs ~1 s a call
    for r in rows:
        r["is_baseline"] = r["provider"] == module.BASELINES[r["op"]]
    for op, baseline in module.BASELINES.items():
        harness.speedups([r for r in rows if r["op"] == op], baseline)
    notes = [*notes, *goals(rows, copy)]
    print("\n".join(harness.table(rows, copy)), flush=True)
    print(harness.write(out, stem or name, rows, copy, notes))
    return not any(r["status"] == "FAILED" for r in rows)


def _stop_on_sigint(budget) -> None:
    """SIGINT (Ctrl-C, or bench/first_hour.py near its time limit) stops adding cases: the case running finishes,
    the rest are skipped rows, and the table is written. A second SIGINT interrupts."""
    def stop(*_):
        budget.seconds = 0.0
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, stop)


def part_kernels(out: Path, budget, dry: bool, stem: str | None = None, cases: list[str] | None = None) -> bool:
    return _timed_part("kernels", "kernel_cases", out, budget, dry, stem=stem, cases=cases, notes=[
        "Byte floor (bench/kernel_cases.py): lookup = ids + output + each distinct row once; backward = grad + ids + "
        "the [U, D] gradient. GB/s = floor / time; % of copy = that / the copy bandwidth above.",
        "Times: triton.testing.do_bench on CUDA (events, L2 flushed before each call), median and worst round."])


def part_scan(out: Path, budget, dry: bool, stem: str | None = None, cases: list[str] | None = None) -> bool:
    return _timed_part("scan", "scan_cases", out, budget, dry, stem=stem, cases=cases, notes=[
        "Byte floor (bench/scan_cases.py): ids read + sorted used ids written. Every provider but pema-map-only "
        "returns the sorted used ids, as torch.unique does."])


def goals(rows: list[dict], copy: dict) -> list[str]:
    """The issue's goals, judged on the rows of this run; a goal whose cases did not run says so."""
    def ok(op, provider, pred=lambda r: True):
        return [r for r in rows if r["op"] == op and r["provider"] == provider and r["status"] == "ok"
                and "speedup" in r and pred(r)]

    def line(what, sel, goal, fmt=lambda r: f"{r['speedup']:.2f}x"):
        if not sel:
            return f"{what}: not measured in this run"
        worst = min(sel, key=lambda r: r["speedup"])
        return f"{what}: worst {fmt(worst)} ({worst['case']}), goal {goal}"

    out = []
    if any(r["op"] == "lookup" for r in rows):
        look = ok("lookup", "pema-nocheck")
        out.append(line("goal, lookup vs F.embedding on remapped ids", look, ">= 1.0x"))
        if look:
            pct = min(100 * r["gbps_median"] / copy["copy_gbps_median"] for r in look if r["N"] >= 65_536) \
                if any(r["N"] >= 65_536 for r in look) else None
            out.append(f"goal, lookup at N >= 64k: worst {pct:.0f}% of copy bandwidth, goal >= 85%" if pct is not None
                       else "goal, lookup % of copy at N >= 64k: not measured in this run")
    if any(r["op"] == "backward" for r in rows):
        at = lambda small: lambda r: r["V"] == 128_256 and (r["N"] <= 65_536) == small  # noqa: E731
        for provider in ("pema", "pema-atomic", "pema-sorted"):
            out.append(line(f"goal, backward {provider} vs full-V nn.Embedding, V = 128,256, N <= 64k",
                            ok("backward", provider, at(True)), ">= 3x"))
        out.append(line("goal, backward pema vs full-V nn.Embedding, V = 128,256, N = 1M",
                        ok("backward", "pema", at(False)), ">= 1.5x"))
    if any(r["op"] == "scan" for r in rows):
        out.append(line("goal, scan pema vs torch.unique at 10^8 ids", ok("scan", "pema", lambda r: r["N"] >= 10**8),
                        ">= 20x"))
    return out


def _subprocess_part(name: str, cmd: list[str], out: Path, budget) -> int | None:
    """Runs a part that is its own script, its log in <name>.log; returns its exit code (None: stopped, past
    its budget and a minute)."""
    import harness

    code = harness.run_logged(cmd, out / f"{name}.log", budget.seconds + 60)
    print((out / f"{name}.log").read_text()[-3000:], flush=True)
    return code


def part_tests(out: Path, budget, dry: bool) -> bool:
    """The kernel test files on CUDA, then every test marked `gpu`; junit XML and a table of counts."""
    ok = True
    lines = ["| selection | collected | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|---:|"]
    others = ["tests", "-m", "gpu", *(f"--ignore={path}" for path in KERNEL_TESTS)]
    for label, selection in (("kernel test files", KERNEL_TESTS), ("other tests marked gpu", others)):
        slug = "tests_" + label.split()[0]
        cmd = [sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider", "--durations=10",
               f"--junitxml={out / (slug + '.xml')}"] + (["--collect-only"] if dry else [])
        code = _subprocess_part(slug, cmd, out, budget)
        counts = _junit_counts(out / f"{slug}.xml")
        # pytest's exit code 5 is "no test collected": where no test is marked gpu, not a failure.
        ok &= code == 0 or (code == 5 and label == "other tests marked gpu")
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", (out / f"{slug}.log").read_text())
        lines.append(f"| {label}{' (collected only: dry run)' if dry else ''} | "
                     f"{collected.group(1) if collected else counts.get('tests', '?')} | {counts.get('passed', '?')} | "
                     f"{counts.get('failures', '?')} | {counts.get('errors', '?')} | {counts.get('skipped', '?')} |")
    (out / "tests.md").write_text("\n".join(["# tests", "", *lines, ""]))
    print("\n".join(lines))
    return ok


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def part_head(out: Path, budget, dry: bool) -> bool:
    return _subprocess_part("head", [sys.executable, str(BENCH / "linear_cross_entropy.py"), "--out", str(out),
                                     "--budget", str(budget.seconds), "--stem", "head"]
                            + (["--rounds", "1"] if dry else []), out, budget) == 0


def part_memory(out: Path, budget, dry: bool) -> bool:
    return _subprocess_part("memory", [sys.executable, str(BENCH / "memory.py"), "--out", str(out)]
                            + (["--models", "bert-base"] if dry else []), out, budget) == 0


if __name__ == "__main__":
    sys.exit(main())
