"""The device-independent benchmark core: a timer, a copy bandwidth, a time budget, failure-proof rows, tables.

- Timer: on CUDA `triton.testing.do_bench` (CUDA events around each call, the L2 cache flushed before each one, so
  inputs are read from HBM every round, not from the 50 MB L2 they would sit in between back-to-back calls); on a
  CPU a `perf_counter` around each call. Both report the median and the worst round, never the best.
- Copy bandwidth: one large `copy_`, timed by the same timer in the same run, so "% of copy" compares an op with
  what this device moved just now rather than with a datasheet (the datasheet peak is reported beside it).
- Budget: a part stops adding cases once its time is spent and reports the cases it skipped.
- `measure`: one (case, provider) row; an exception or a result that differs from the reference makes a FAILED
  row with the error text, and the table goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Nominal HBM/DRAM bandwidth of common training GPUs (vendor datasheets), GB/s; the first key found in the device
# name wins, so the specific names come before "H100".
DATASHEET_GBPS = {
    "H200": 4800, "H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "T4": 320, "A10G": 600,
}


def dry_run() -> bool:
    """Tiny shapes on the CPU (the CI check that the GPU scripts still run): PEMA_GPU_DRY_RUN=1."""
    return os.environ.get("PEMA_GPU_DRY_RUN") == "1"


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else f"cpu x{os.cpu_count()}"


def device_slug() -> str:
    """The results folder's name: `NVIDIA_H100_80GB_HBM3`, `cpu`, or `cpu-dry-run`."""
    if dry_run():
        return "cpu-dry-run"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in torch.cuda.get_device_name()) if ON_GPU else "cpu"


def datasheet_gbps() -> float | None:
    name = device_name()
    return next((gbps for key, gbps in DATASHEET_GBPS.items() if key in name), None) if ON_GPU else None


@dataclass
class Timing:
    median_s: float
    worst_s: float
    rounds: int


def time_fn(fn, *, rounds: int = 5) -> Timing:
    """Median and worst time of `fn()`; on CUDA by do_bench (events, L2 flushed), `rounds` used only on a CPU."""
    if ON_GPU:
        from triton.testing import do_bench

        # 25 ms of warm-up and 100 ms of timed calls (do_bench's defaults): 10-1000 rounds for 0.1-10 ms ops.
        try:
            times_ms = do_bench(fn, warmup=25, rep=100, return_mode="all")
        except (AssertionError, ValueError):  # a Triton whose do_bench has no "all": the two quantiles only
            median_ms, worst_ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 1.0])
            return Timing(median_ms / 1e3, worst_ms / 1e3, -1)
        return Timing(statistics.median(times_ms) / 1e3, max(times_ms) / 1e3, len(times_ms))
    fn()  # warm-up: first-call allocations (and compilation under the interpreter)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), max(times), rounds)


def copy_gbps(nbytes: int, *, rounds: int = 5) -> dict:
    """What this device copies now: read + write of an `nbytes` tensor, GB/s at the median and the worst round."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), rounds=rounds)
    moved = 2 * src.numel() * 4
    del src, dst
    return {"copy_bytes": moved, "copy_gbps_median": moved / t.median_s / 1e9,
            "copy_gbps_worst": moved / t.worst_s / 1e9}


def environment() -> dict:
    """Device and library versions the results belong to (driver from nvidia-smi where there is one)."""
    import pema_triton

    env = {"device": device_name(), "dry_run": dry_run(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "pema_triton": pema_triton.__version__, "python": platform.python_version(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "datasheet_gbps": datasheet_gbps(),
           # On a shared CPU the threads torch uses and the load beside it decide its times (another process on
           # one of 2 cores made 2-thread torch.bincount 5x slower than 1-thread here): both are recorded.
           "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["driver"] = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["git_commit"] = _run_text(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"])
    return env


def _run_text(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    result = subprocess.run(cmd, capture_output=True, text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


@dataclass
class Budget:
    """Seconds a part may spend; `spent()` is checked before each case, so one case may run past it."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def spent(self) -> bool:
        return time.monotonic() - self.start > self.seconds


def measure(row: dict, make_fn, *, floor_bytes: int, rounds: int = 5) -> dict:
    """Checks then times one provider: `make_fn()` returns (fn, check) where `check(fn())` raises on a wrong
    result. Any exception becomes `status: FAILED` with its text; a provider that cannot run here is
    `unavailable`, said by raising `Unavailable`."""
    row = dict(row, floor_bytes=floor_bytes)
    try:
        fn, check = make_fn()
        check(fn())
        t = time_fn(fn, rounds=rounds)
        row.update(status="ok", median_s=t.median_s, worst_s=t.worst_s, rounds=t.rounds,
                   gbps_median=floor_bytes / t.median_s / 1e9, gbps_worst=floor_bytes / t.worst_s / 1e9)
    except Unavailable as why:
        row.update(status="unavailable", error=str(why))
    except Exception as error:  # noqa: BLE001 - the table reports every failure, whatever it is
        lines = [line.strip() for line in str(error).splitlines() if line.strip()][:3]  # assert_close: the diffs
        row.update(status="FAILED", error=f"{type(error).__name__}: {'; '.join(lines)[:240]}")
    finally:
        if ON_GPU:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a CUDA error poisons the context; the later rows will say so
                pass
    return row


class Unavailable(Exception):
    """A provider that does not exist in this build or on this machine (a row, not a failure)."""


def triton_kernels(device: torch.device):
    """`pema_triton.ops.kernels` where its Triton kernels can run on `device`, else Unavailable: for the providers
    that launch a kernel the ops would not pick."""
    import pema_triton

    try:
        from pema_triton.ops import kernels
    except ImportError as missing:
        raise Unavailable(f"Triton is not installed: {missing}") from None
    if pema_triton.resolve_backend("auto", device) != "triton":
        raise Unavailable("a Triton kernel only: needs a GPU (or TRITON_INTERPRET=1)")
    return kernels


def select(cases: list[tuple], patterns: list[str] | None, name) -> list[tuple]:
    """The cases whose `name(*case)` matches one of the regular expressions `patterns`, the first pattern's cases
    first (the budget drops the tail); every case, in grid order, when `patterns` is empty."""
    if not patterns:
        return list(cases)
    chosen = []
    for pattern in patterns:
        chosen += [c for c in cases if re.search(pattern, name(*c)) and c not in chosen]
    return chosen


INTERRUPTED = "[sent SIGINT"  # what run_logged writes into the log before it interrupts


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None, grace: float = 15) -> int | None:
    """Runs `cmd` (from the repository root) with its output in `log`; returns its exit code, or None when it had to
    be killed. `grace` s before `timeout` (at most half of it) it gets SIGINT (pytest ends its run and writes its junit
    XML, gpu.py stops adding cases and writes its rows; the log says so), at `timeout` SIGKILL, each sent to its whole
    process group (a benchmark's per-case processes too): it never runs past `timeout`."""
    grace = min(grace, timeout / 2)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        steps = ((None, timeout - grace, INTERRUPTED), (signal.SIGINT, grace, "[sent SIGKILL"),
                 (signal.SIGKILL, None, ""))
        for sig, wait, note in steps:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=wait)
                return None if sig == signal.SIGKILL else code
            out.flush()
            out.write(f"\n{note}: its time limit is {timeout:.0f} s]\n")


def skipped(rows: list[dict], row: dict, why: str) -> None:
    rows.append(dict(row, status="skipped", error=why))


def speedups(rows: list[dict], baseline: str) -> None:
    """Adds `speedup` (baseline median / provider median, same case, same run) to every timed row."""
    base = {r["case"]: r["median_s"] for r in rows if r["provider"] == baseline and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["case"] in base:
            r["speedup"] = base[r["case"]] / r["median_s"]


def table(rows: list[dict], copy: dict) -> list[str]:
    """Markdown rows: median and worst time, speed-up over the baseline, GB/s of the byte floor, % of copy."""
    peak = datasheet_gbps()
    lines = ["| op | case | provider | status | median | worst | speed-up vs baseline | floor | GB/s median (worst) "
             f"| % of copy{' | % of datasheet' if peak else ''} |",
             f"|---|---|---|---|---:|---:|---:|---:|---:|---:|{'---:|' if peak else ''}"]
    for r in rows:
        head = f"| {r['op']} | {r['case']} | {r['provider']}{' (baseline)' if r.get('is_baseline') else ''}"
        if r["status"] != "ok":
            lines.append(f"{head} | {r['status']}: {r.get('error', '')} | | | | | | |{' |' if peak else ''}")
            continue
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        pct = f"{100 * r['gbps_median'] / copy['copy_gbps_median']:.0f}%"
        lines.append(f"{head} | ok | {_ms(r['median_s'])} | {_ms(r['worst_s'])} | {speed} | "
                     f"{r['floor_bytes'] / 1e6:,.1f} MB | {r['gbps_median']:,.1f} ({r['gbps_worst']:,.1f}) | {pct} |"
                     + (f" {100 * r['gbps_median'] / peak:.0f}% |" if peak else ""))
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f} ms"


def write(out: Path, stem: str, rows: list[dict], copy: dict, notes: list[str]) -> Path:
    """Writes `<stem>.json` (raw rows, copy bandwidth, environment) and `<stem>.md` (the table) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    part = stem.split("_")[0]
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "copy": copy, "rows": rows}, indent=1) + "\n")
    peak = f"; datasheet {env['datasheet_gbps']:,} GB/s" if env["datasheet_gbps"] else ""
    lines = [f"# {part} on {env['device']}{' (dry run: tiny shapes, not a measurement)' if env['dry_run'] else ''}",
             "", f"Copy bandwidth measured in this run: {copy['copy_gbps_median']:,.0f} GB/s median, "
             f"{copy['copy_gbps_worst']:,.0f} GB/s worst ({copy['copy_bytes'] / 1e9:.2f} GB read + written){peak}. "
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}, "
             f"commit {env['git_commit']}."
             + ("" if ON_GPU else f" torch threads {env['torch_threads']}, load average {env['load_average_1min']} "
                                  "when the run started."),
             "", *table(rows, copy), "", *[f"- {n}" for n in notes]]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
