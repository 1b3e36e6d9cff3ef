"""`scripts/gpu.sh first-hour`: the measurements that settle the design, in one command of at most 9 minutes.

For a short window on a borrowed GPU (one H100/H200, at most 10 minutes a command): one call of the device tool,

    command    bash scripts/gpu.sh first-hour --out "$OUT/first-hour"
    carry      [".whl", "bench/.ids"]   .whl/gpu/: the anchors' wheels (`bash scripts/setup.sh` downloads them);
                                        bench/.ids: real-text ids (optional: without them, synthetic Zipf ids)
    timeout_s  600

then copy the folder that comes back to bench/results/gpu/<device>/first-hour/ and commit it. Sub-parts, in this
order, each in its own process under a hard time limit: a crash, a hang or a failed check is a FAILED line and the
next one still runs; the exit code is 1 when one failed.

    anchors  Liger's and Cut Cross-Entropy's wheels from .whl/gpu/, installed offline (pip --no-index --no-deps, else
             unzipped) into a temporary folder on the head's PYTHONPATH; a failed install is a noted line
    head     fused loss forward + backward beside its anchors, V = 151,936, D = 4,096 (Qwen3-8B's head), bf16,
             N = 8k then 32k: fused frozen, unfused frozen, Liger, CCE, F.linear_cross_entropy, fused restricted,
             restricted, log-probs frozen (TRL's fused head) (bench/linear_cross_entropy.py)
    kernels  lookup and backward at V = 128,256, D = 4,096, N = 64k and 1M, bf16 then fp32 (bench/kernel_cases.py)
    scan     the vocabulary scan of 10^8 ids at V = 128,256, int64 then int32 (bench/scan_cases.py)
    tests    the kernel test files on CUDA, interrupted (SIGINT: pytest keeps its counts) when their time is spent

Writes first-hour.md (each sub-part's status and time, the key ratios, what was skipped), first-hour.json,
environment.json, and each sub-part's raw JSON, table and log. --dry-run: all of it on the CPU with tiny shapes
under TRITON_INTERPRET=1, in about a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import harness
from ids import IDS_DIR

BENCH = Path(__file__).resolve().parent
WHEELS = BENCH.parent / ".whl" / "gpu"
# 9 minutes, so that the device tool's 600 s limit keeps 60 s for a slow start and the last writes.
TOTAL_S = 540
# (sub-part, hard limit s, grace s): the sub-part stops adding cases `grace` before its limit (the case that starts
# just before that, and its process's start-up, fit in the grace); SIGINT near the limit, SIGKILL at it. Limits add
# up to TOTAL_S: 15+250+105+70+100. Time a sub-part leaves unused goes to the next ones. Reasoning (H100, a fresh
# Triton cache):
# - head: 16 cases, each a process (5 s of imports, first-call compiles of 5-15 s, then 6 steps of 0.05-0.5 s:
#   8k is 3e13 FLOP a step, 32k 1.2e14): 8-15 s a case, about 215 s. A running case is stopped at the deadline only
#   (a slow first compile takes the later cases' time; they become skipped rows).
# - kernels: 8 cases (4 of them "unavailable" without bench/.ids) of 9 providers (the sorted backward's 2 candidate
#   tiles among them, bf16 only for the MMA), ~125 ms of do_bench each plus the checks, the 1M-id gradients (8.6 GB
#   bf16) and each tile's first compile: 3-10 s a case.
# - scan: 4 cases of 10^8 ids (0.4-0.8 GB), 5 timed providers: 3-6 s a case.
# - tests: whatever is left, at least 80 s; the counts say how many of the collected tests ran.
PLAN = [("anchors", 15, 0), ("head", 250, 60), ("kernels", 105, 35), ("scan", 70, 30), ("tests", 100, 20)]
HEAD = {"shape": ["151936", "4096", "qwen2.5-0.5b"], "tokens": ["8192", "32768"]}
HEAD_DRY = {"shape": ["4096", "64", "zipf"], "tokens": ["64"]}
HEAD_PROVIDERS = ["fused frozen", "unfused frozen", "liger", "cut-cross-entropy", "F.linear_cross_entropy",
                  "fused restricted", "restricted", "log-probs frozen"]
KERNEL_CASES = [r"^V128256-.*-D4096-N(65536|1048576)-bfloat16$", r"^V128256-.*-D4096-N(65536|1048576)-float32$"]
SCAN_CASES = [r"^V128256-.*-N1e8-int64$", r"^V128256-.*-N1e8-int32$"]


class Context:
    def __init__(self, out: Path, dry: bool):
        self.out, self.dry, self.anchors = out, dry, None
        self.versions: dict[str, str] = {}

    def env(self, anchors: bool = False) -> dict:
        path = [str(self.anchors)] if anchors and self.anchors else []
        return dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]))


def run(out: Path, dry: bool, budget: float | None = None) -> int:
    """Every sub-part in turn within `budget` seconds (default TOTAL_S); 1 if one of them failed."""
    total = budget or TOTAL_S
    scale = total / TOTAL_S
    out.mkdir(parents=True, exist_ok=True)
    ctx, start, results = Context(out, dry), time.monotonic(), []
    env = harness.environment()
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    print(f"== first-hour -> {out} ({total:.0f} s in all{', dry run' if dry else ''})", flush=True)
    for index, (name, _, grace) in enumerate(PLAN):
        later = sum(limit for _, limit, _ in PLAN[index + 1:]) * scale
        limit = total - (time.monotonic() - start) - later
        begun = time.monotonic()
        if limit - grace * scale < 5:
            result = {"status": f"skipped: {max(limit, 0):.0f} s left, not enough"}
        else:
            print(f"== {name} (limit {limit:.0f} s, cases {limit - grace * scale:.0f} s)", flush=True)
            try:
                result = SUBPARTS[name](ctx, limit, limit - grace * scale)
            except Exception as error:  # noqa: BLE001 - the driver itself: the next sub-part still runs
                result = {"status": f"FAILED: {type(error).__name__}: {error}"}
        result |= {"name": name, "seconds": time.monotonic() - begun, "limit_s": max(limit, 0)}
        results.append(result)
        print(f"== {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    if ctx.anchors:
        shutil.rmtree(ctx.anchors, ignore_errors=True)
    env |= {"anchors": ctx.versions, "bench_ids": sorted(p.name for p in IDS_DIR.glob("*.npz")),
            "first_hour_budget_s": total, "first_hour_plan": PLAN}
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    lines = summary(out, results, env, time.monotonic() - start, dry)
    (out / "first-hour.json").write_text(json.dumps({"environment": env, "subparts": results}, indent=1) + "\n")
    (out / "first-hour.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    failed = [r["name"] for r in results if r["status"].startswith("FAILED")]
    print(f"results in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def anchors(ctx: Context, limit: float, _budget: float) -> dict:
    """Installs each wheel in .whl/gpu/ offline into one temporary folder; whatever happens, a noted line."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"status": f"noted: no wheels in {WHEELS} (`bash scripts/setup.sh` downloads them; carry .whl)"}
    ctx.anchors = Path(tempfile.mkdtemp(prefix="pema-anchors-"))
    notes = []
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q",
               "--disable-pip-version-check", "--target", str(ctx.anchors), str(wheel)]
        code = harness.run_logged(cmd, ctx.out / f"anchors_{name}.log", limit / len(wheels), grace=1)
        how = "pip"
        if code != 0:  # no pip on the image, or it failed: a py3-none-any wheel is a zip of the package
            try:
                zipfile.ZipFile(wheel).extractall(ctx.anchors)
                how = f"unzipped (pip: {'timed out' if code is None else f'exit {code}'})"
            except (OSError, zipfile.BadZipFile) as error:
                notes.append(f"{name} {version} not installed: {error}")
                continue
        ctx.versions[name] = version
        notes.append(f"{name} {version} ({how})")
    return {"status": "noted: " + "; ".join(notes), "files": [p.name for p in ctx.out.glob("anchors_*.log")]}


def head(ctx: Context, limit: float, budget: float) -> dict:
    spec = HEAD_DRY if ctx.dry else HEAD
    # A running case is stopped 20 s before the limit (its clock starts ~5 s after ours, after its imports); the
    # head itself gets SIGINT 10 s before it: its rows are on disk after each case either way.
    cmd = [sys.executable, str(BENCH / "linear_cross_entropy.py"), "--out", str(ctx.out), "--stem", "head",
           "--budget", f"{budget:.0f}", "--deadline", f"{limit - 20:.0f}", "--rounds", "1" if ctx.dry else "5",
           "--shape", *spec["shape"], "--tokens", *spec["tokens"], "--providers", *HEAD_PROVIDERS]
    (ctx.out / "head.json").unlink(missing_ok=True)  # an earlier run's rows are not this one's
    code = harness.run_logged(cmd, ctx.out / "head.log", limit, env=ctx.env(anchors=True), grace=10)
    rows = _rows(ctx.out / "head.json")
    failed = [f"{r['provider']} at N={r['N']}: {r['error']}" for r in rows if "error" in r and not r.get("oom")]
    return _status("head", ctx, code, limit, failed, rows)


def timed(part: str, patterns: list[str]):
    def sub(ctx: Context, limit: float, budget: float) -> dict:
        cmd = [sys.executable, str(BENCH / "gpu.py"), part, "--out", str(ctx.out), "--budget", f"{budget:.0f}"]
        cmd += ["--dry-run"] if ctx.dry else [arg for p in patterns for arg in ("--cases", p)]
        # SIGINT 20 s before the limit: no new case, the running one may finish, the table is written.
        (ctx.out / f"{part}.json").unlink(missing_ok=True)
        code = harness.run_logged(cmd, ctx.out / f"{part}.log", limit, env=ctx.env(), grace=20)
        rows = _rows(ctx.out / f"{part}.json")
        failed = [f"{r['op']} {r['provider']} {r['case']}: {r.get('error', '')}" for r in rows
                  if r.get("status") == "FAILED"]
        return _status(part, ctx, code, limit, failed, rows)
    return sub


def tests(ctx: Context, limit: float, budget: float) -> dict:
    from gpu import KERNEL_TESTS, _junit_counts

    xml, log = ctx.out / "tests.xml", ctx.out / "tests.log"
    cmd = [sys.executable, "-m", "pytest", *KERNEL_TESTS, "-p", "no:cacheprovider", "--durations=10",
           f"--junitxml={xml}"] + (["--collect-only", "-q"] if ctx.dry else [])
    xml.unlink(missing_ok=True)
    code = harness.run_logged(cmd, log, limit, env=ctx.env(), grace=limit - budget)  # SIGINT at the budget
    counts, text = _junit_counts(xml), log.read_text() if log.exists() else ""
    found = re.search(r"collected (\d+) items?", text) or re.search(r"(\d+) tests? collected", text)
    collected = int(found.group(1)) if found else None
    ran = counts.get("tests", 0)
    result = {"files": [xml.name, log.name], "collected": collected, **counts}
    if ctx.dry:
        ok = code == 0 and collected
        return result | {"status": f"ok: {collected} collected (dry run)" if ok else f"FAILED: exit {code}"}
    interrupted = harness.INTERRUPTED in text  # pytest's exit code is then 2, its counts those of the tests run
    if code is None or counts.get("failures") or counts.get("errors") or code not in (0, 2 if interrupted else 0):
        return result | {"status": f"FAILED: {counts.get('failures', '?')} failed, {counts.get('errors', '?')} errors "
                                   f"of {ran} run ({'killed' if code is None else f'exit {code}'}; see tests.log)"}
    stopped = f"; time spent, {collected - ran if collected else '?'} of {collected or '?'} not run" \
        if interrupted else ""
    return result | {"status": f"ok: {counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped{stopped}"}


def _rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def _status(part: str, ctx: Context, code: int | None, limit: float, failed: list[str], rows: list[dict]) -> dict:
    """A sub-part's line: FAILED with its first errors, or ok with how many cases the budget skipped."""
    files = sorted(p.name for p in ctx.out.glob(f"{part}.*"))
    log = ctx.out / f"{part}.log"
    text = log.read_text() if log.exists() else ""
    print(text[-1500:], flush=True)
    stopped = harness.INTERRUPTED in text  # SIGINT near its limit: it stopped adding cases and wrote its rows
    if code is None:
        failed = [f"killed at its time limit of {limit:.0f} s", *failed]
    elif code != 0 and not failed and not stopped:
        tail = [line for line in text.splitlines() if line.strip()]
        failed = [f"exit {code}: {tail[-1][:200] if tail else 'no output'}"]
    if not rows:
        failed = [*failed, f"no rows in {part}.json"]
    if failed:
        more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
        return {"status": "FAILED: " + "; ".join(failed[:3]) + more, "files": files}
    skipped = sum(1 for r in rows if "skipped" in r or r.get("status") == "skipped")
    return {"status": f"ok: {len(rows)} rows" + (f", {skipped} skipped (see below)" if skipped else "")
            + (", stopped at its time limit" if stopped else ""), "files": files}


def summary(out: Path, results: list[dict], env: dict, seconds: float, dry: bool) -> list[str]:
    """first-hour.md: each sub-part's status and time, the key ratios, and what was skipped."""
    ids = ", ".join(env["bench_ids"]) or "none (synthetic Zipf ids)"
    anchors = ", ".join(f"{k} {v}" for k, v in env["anchors"].items()) or "none installed"
    lines = [f"# First hour on {env['device']}" + (" (dry run: tiny shapes, not a measurement)" if dry else ""), "",
             f"`bash scripts/gpu.sh first-hour`: {seconds:.0f} s used of {env['first_hour_budget_s']:.0f} s. "
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}, commit "
             f"{env['git_commit']}. Anchors: {anchors}. Real-text ids (bench/.ids): {ids}.", "",
             "| sub-part | status | time used | time limit | files |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['name']} | {_cell(r['status'])} | {r['seconds']:.0f} s | {r['limit_s']:.0f} s | "
              f"{', '.join(r.get('files', []))} |" for r in results]
    for title, section in (("Fused loss vs its anchors (head)", _head_lines), ("Lookup and backward (kernels)",
                           _kernel_lines), ("Scan at 10^8 ids (scan)", _scan_lines), ("Skipped", _skipped_lines)):
        try:
            body = section(out, results)
        except Exception as error:  # noqa: BLE001 - a summary with a hole beats none
            body = [f"not computed: {type(error).__name__}: {error}"]
        lines += ["", f"## {title}", "", *(body or ["nothing"])]
    return lines


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _state(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row.get("oom"):
        return "out of memory"
    key = next((k for k in ("error", "skipped", "unavailable") if k in row), None)
    return f"{'failed' if key == 'error' else key}: {_cell(row[key])[:80]}" if key else row.get("status", "?")


def _head_lines(out: Path, _results) -> list[str]:
    rows = _rows(out / "head.json")
    if not rows:
        return ["no rows (see head.log)"]
    get = lambda n, p: next((r for r in rows if r["N"] == n and r["provider"] == p), None)  # noqa: E731

    def ratio(n, mine, other):
        a, b = get(n, mine), get(n, other)
        bad = [f"{p}: {_state(r)}" for p, r in ((mine, a), (other, b)) if r is None or "median_s" not in r]
        return f"n/a ({'; '.join(bad)})" if bad else \
            f"{b['median_s'] / a['median_s']:.2f}x time, {a['peak_bytes'] / b['peak_bytes']:.0%} memory"

    dtype = next((r["dtype"].replace("torch.", "") for r in rows if "dtype" in r), "?")
    lines = [f"{rows[0]['model']}, {dtype}. Time: the anchor's median / fused frozen's (above 1: fused is faster); "
             "memory: fused frozen's peak / the anchor's.", "", "| N | fused frozen | vs unfused frozen | vs Liger | "
             "vs CCE | vs F.linear_cross_entropy | fused restricted vs restricted | log-probs frozen vs unfused "
             "frozen |", "|---:|---|---|---|---|---|---|---|"]
    for n in sorted({r["N"] for r in rows}):
        fused = get(n, "fused frozen")
        cells = [f"{fused['median_s'] * 1e3:,.1f} ms, {fused['peak_bytes'] / 2**20:,.0f} MiB"
                 if fused and "median_s" in fused else _state(fused)]
        cells += [ratio(n, "fused frozen", o) for o in ("unfused frozen", "liger", "cut-cross-entropy",
                                                        "F.linear_cross_entropy")]
        cells += [ratio(n, "fused restricted", "restricted"), ratio(n, "log-probs frozen", "unfused frozen")]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return lines


def _timed_rows(out: Path, part: str) -> tuple[list[dict], float, list[str]]:
    data = json.loads((out / f"{part}.json").read_text())
    rows = data["rows"]
    return rows, data["copy"]["copy_gbps_median"], [c for c in dict.fromkeys(r["case"] for r in rows)
                                                     if any(r["case"] == c and r["status"] == "ok" for r in rows)]


def _cells(rows, case, copy, wanted) -> list[str]:
    """% of copy of each (op, provider) in `wanted`, or its status."""
    found = [next((r for r in rows if r["case"] == case and (r["op"], r["provider"]) == w), None) for w in wanted]
    return [f"{100 * r['gbps_median'] / copy:.0f}%" if r and r["status"] == "ok" else (r or {}).get("status", "-")
            for r in found]


def _kernel_lines(out: Path, _results) -> list[str]:
    rows, copy, cases = _timed_rows(out, "kernels")
    tiles = sorted({r["provider"] for r in rows if r["provider"].startswith("pema-sorted-")})  # the other tiles
    wanted = [("lookup", "pema"), ("lookup", "pema-nocheck"), ("lookup", "F.embedding-remapped"), ("backward", "pema"),
              ("backward", "pema-sorted"), *[("backward", p) for p in tiles], ("backward", "pema-atomic"),
              ("backward", "nn.Embedding-full-V")]
    lines = [f"% of the copy bandwidth measured in the same run ({copy:,.0f} GB/s), of each case's byte floor; "
             "speed-up: the full-V backward's time / pema's.", "",
             "| case | " + " | ".join(f"{op} {p}" for op, p in wanted) + " | backward speed-up |",
             "|---|" + "---:|" * (len(wanted) + 1)]
    for case in cases:
        pema = next((r for r in rows if r["case"] == case and r["op"] == "backward" and r["provider"] == "pema"), {})
        speed = f"{pema['speedup']:.2f}x" if "speedup" in pema else "-"
        lines.append(f"| {case} | " + " | ".join(_cells(rows, case, copy, wanted) + [speed]) + " |")
    return lines


def _scan_lines(out: Path, _results) -> list[str]:
    rows, copy, cases = _timed_rows(out, "scan")
    wanted = [("scan", "pema"), ("scan", "pema-map-only"), ("scan", "pema-packed-bits"), ("scan", "torch.unique")]
    lines = [f"% of copy ({copy:,.0f} GB/s); speed-up: torch.unique's time / pema's (sorted used ids, both).", "",
             "| case | pema vs torch.unique | " + " | ".join(p for _, p in wanted) + " |", "|---|" + "---:|" * 5]
    for case in cases:
        pema = next((r for r in rows if r["case"] == case and r["provider"] == "pema"), {})
        speed = f"{pema['speedup']:.1f}x" if "speedup" in pema else "-"
        lines.append(f"| {case} | {speed} | " + " | ".join(_cells(rows, case, copy, wanted)) + " |")
    return lines


def _skipped_lines(out: Path, results: list[dict]) -> list[str]:
    lines = [f"- {r['name']}: {r['status']}" for r in results if r["status"].startswith("skipped")]
    lines += [f"- head: {r['provider']} at N = {r['N']:,}: {_state(r)}" for r in _rows(out / "head.json")
              if "median_s" not in r and "error" not in r or r.get("oom")]
    for part in ("kernels", "scan"):
        why: dict[str, set] = {}
        for r in _rows(out / f"{part}.json"):
            if r["status"] in ("skipped", "unavailable"):
                why.setdefault(r["case"], set()).add(f"{r['status']}: {r.get('error', '')[:100]}")
        lines += [f"- {part}: {case}: {'; '.join(sorted(reasons))}" for case, reasons in why.items()]
    lines += [f"- tests: {r['status'].split('; ', 1)[1]}" for r in results
              if r["name"] == "tests" and "not run" in r["status"]]
    return lines


SUBPARTS = {"anchors": anchors, "head": head, "kernels": timed("kernels", KERNEL_CASES),
            "scan": timed("scan", SCAN_CASES), "tests": tests}
