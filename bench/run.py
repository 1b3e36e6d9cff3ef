"""Runs every benchmark that fits this machine and writes results under bench/results/.

    python bench/run.py            # kernels (pytest-benchmark), memory, head + loss, vocabulary usage, trim
    python bench/run.py --only kernels

Kernel results: the raw pytest-benchmark JSON, and a markdown table with, per case, each provider's median time,
its speed-up over the baseline measured in the same run, and its achieved bandwidth (bytes the op must move /
median time) next to the device's peak. On a GPU the project's targets (docs/design.md) are checked: lookup at least as fast as
F.embedding and at 85% of peak on large inputs, backward 3x faster than the full-vocabulary backward at V=128k,
scan 20x faster than torch.unique.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def device_tag() -> str:
    return torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def run_kernels(tag: str, extra: list[str]) -> Path:
    raw = RESULTS / f"kernels_{tag}.benchmark.json"
    cmd = [sys.executable, "-m", "pytest", str(BENCH / "test_bench_kernels.py"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", "--benchmark-columns=median,rounds", *extra]
    subprocess.run(cmd, check=True, cwd=BENCH)
    return raw


def summarize_kernels(raw: Path, tag: str) -> list[dict]:
    data = json.loads(raw.read_text())
    by_case = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        by_case[(info["op"], info["case"])][info["provider"]] = {"median_s": b["stats"]["median"], **info}
    rows = []
    for (op, case), providers in by_case.items():
        baseline = next(iter(providers.values()))["baseline"]
        base_s = providers.get(baseline, {}).get("median_s")
        for provider, r in providers.items():
            gbps = r["bytes"] / r["median_s"] / 1e9
            rows.append({
                "op": op, "case": case, "provider": provider, "baseline": baseline, "median_ms": r["median_s"] * 1e3,
                "speedup_vs_baseline": base_s / r["median_s"] if base_s else None, "gbps": gbps,
                "peak_gbps": r["peak_gbps"], "pct_of_peak": 100 * gbps / r["peak_gbps"], "peak_source": r["peak_source"],
                "device": r["device"],
            })
    (RESULTS / f"kernels_{tag}.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2) + "\n")
    first = rows[0]
    lines = [
        f"Device: {first['device']}; peak {first['peak_gbps']:,.0f} GB/s ({first['peak_source']}). "
        f"{', '.join(f'{k} {v}' for k, v in environment().items() if k != 'device')}. "
        f"Speed-up = baseline median / provider median, same run.",
        "",
        "| op | case | provider | median | speed-up vs baseline | GB/s | % of peak |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['provider']}{' (baseline)' if r['provider'] == r['baseline'] else ''}"
                     f" | {r['median_ms']:.3f} ms | {speed} | {r['gbps']:.1f} | {r['pct_of_peak']:.0f}% |")
    lines += ["", *goals(rows)]
    (RESULTS / f"kernels_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_kernels(rows, tag)
    return rows


def environment() -> dict:
    """Device and library versions the results belong to."""
    import platform

    import pema_triton

    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "pema_triton": pema_triton.__version__,
           "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def goals(rows) -> list[str]:
    """The project's kernel targets (docs/design.md), judged on this run (they are GPU targets; on a CPU they describe the reference path)."""
    def pick(op, provider, pred=lambda case: True):
        return [r for r in rows if r["op"] == op and r["provider"] == provider and pred(r["case"])]

    out = ["Goals (GPU targets):"]
    lookup = pick("lookup", "pema-nocheck", lambda c: "N1048576" in c) or pick("lookup", "pema-nocheck")
    if lookup:
        worst = min(r["speedup_vs_baseline"] for r in lookup)
        best_peak = max(r["pct_of_peak"] for r in lookup)
        out.append(f"- lookup vs F.embedding on remapped ids (largest N): worst {worst:.2f}x "
                   f"(goal >= 1x), best {best_peak:.0f}% of peak (goal 85%)")
    backward = pick("backward", "pema", lambda c: "V128256" in c)
    if backward:
        worst = min(r["speedup_vs_baseline"] for r in backward)
        out.append(f"- backward vs full-vocabulary nn.Embedding backward at V=128,256: worst {worst:.2f}x (goal >= 3x)")
    scan = pick("scan", "pema")
    if scan:
        unique = {r["case"]: r["median_ms"] for r in pick("scan", "torch.unique")}
        worst = min(unique[r["case"]] / r["median_ms"] for r in scan)
        out.append(f"- scan vs torch.unique: worst {worst:.1f}x (goal >= 20x)")
    packed = {r["case"]: r["median_ms"] for r in pick("scan", "pema-packed-bits")}
    if packed and scan:
        ratios = ", ".join(f"{r['case']} {packed[r['case']] / r['median_ms']:.2f}x" for r in scan if r["case"] in packed)
        out.append(f"- scan layout, packed-bit time / byte-map time (above 1: bytes are faster): {ratios}")
    return out


def plot_kernels(rows, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = ["lookup", "backward", "forward+backward", "scan"]
    fig, axes = plt.subplots(1, len(ops), figsize=(16, 4))
    for ax, op in zip(axes, ops):
        sel = [r for r in rows if r["op"] == op and r["provider"] != r["baseline"] and r["speedup_vs_baseline"]]
        labels = [f"{r['case']}\n{r['provider']}" for r in sel]
        ax.barh(range(len(sel)), [r["speedup_vs_baseline"] for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=5)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{op}: speed-up vs {sel[0]['baseline'] if sel else ''}", fontsize=8)
    fig.suptitle(f"pema_triton kernels on {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"kernels_{tag}.png", dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["kernels", "memory", "loss", "vocab", "trim"], action="append")
    p.add_argument("pytest_args", nargs="*", help="extra pytest-benchmark arguments for the kernel benchmarks")
    args = p.parse_args(argv)
    only = set(args.only or ["kernels", "memory", "loss", "vocab", "trim"])
    RESULTS.mkdir(exist_ok=True)
    tag = device_tag()
    if "kernels" in only:
        summarize_kernels(run_kernels(tag, args.pytest_args), tag)
    if "memory" in only:
        subprocess.run([sys.executable, str(BENCH / "memory.py")], check=True)
    if "loss" in only:
        subprocess.run([sys.executable, str(BENCH / "loss.py")], check=True)
    if "vocab" in only:
        subprocess.run([sys.executable, str(BENCH / "vocab_usage.py")], check=True)
    if "trim" in only:
        subprocess.run([sys.executable, str(BENCH / "trim.py")], check=True)


if __name__ == "__main__":
    main()
