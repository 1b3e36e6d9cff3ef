"""bench/peers.py's table, raw JSON and plot: every figure comes from the rows the run measured."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from peer_methods import NAMES, REWRITES

MIB = 2**20
VERSIONS = ["torch", "transformers", "datasets", "peft", "transformer-smaller-training-vocab", "numpy", "pema_triton"]


def versions() -> dict:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> str:
    import os

    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} CPU cores ({model}), Python {platform.python_version()}, {platform.system()}"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / MIB:,.1f} MiB"


def method_lines(rows: list[dict]) -> list[str]:
    lines = ["| method | max abs Δ vs full FT (all final weights) | bit-identical | embedding rows trained | "
             "trainable parameters | training state (AdamW: weights + grads + 2 moments) | peak RSS (process) | "
             "peak RSS above loaded model | step wall time: median (worst) | step CPU time: median | set-up time | "
             "merge-back time | final loss | what the user must rewrite |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = NAMES[r["method"]]
        if r["status"] != "ok":
            lines.append(f"| {name} | FAILED: {r.get('error')} |" + " |" * 12)
            continue
        diff = r.get("diff_error") or (f"{r['max_abs_diff']:.3g}" if r.get("max_abs_diff") is not None else "n/a")
        rows_trained = f"{r['rows']:,} of {r['V']:,}" if r["rows"] else f"all {r['V']:,}"
        lines.append(
            f"| {name} | {diff} | {'yes' if r.get('bit_identical') else 'no'} | {rows_trained} | {r['trainable']:,} | "
            f"{_mib(r['train_state_bytes'])} | {_mib(r['peak_rss_bytes'])} | {_mib(r['peak_rss_above_loaded_bytes'])} "
            f"| {r['median_step_s'] * 1e3:,.0f} ms ({max(r['step_s'][1:] or r['step_s']) * 1e3:,.0f}) | "
            f"{r['median_step_cpu_s'] * 1e3:,.0f} ms | {r['setup_s'] * 1e3:,.0f} ms | {r['merge_s'] * 1e3:,.0f} ms | "
            f"{r['losses'][-1]:.4f} | {REWRITES[r['method']]} |")
    return lines


def scan_lines(scans: list[dict]) -> list[str]:
    ok = {s["provider"]: s["median_s"] for s in scans if s["status"] == "ok"}
    unique, upstream = ok.get("torch.unique"), ok.get("upstream counter (numpy datasets.map + np.bincount)")
    lines = ["| provider | median | worst | speed-up vs torch.unique | speed-up vs upstream's counter |",
             "|---|---:|---:|---:|---:|"]
    for s in scans:
        if s["status"] != "ok":
            lines.append(f"| {s['provider']} | {s['status']}: {s.get('error', '')} | | | |")
            continue
        rel = [f"{base / s['median_s']:.2f}x" if base else "n/a" for base in (unique, upstream)]
        lines.append(f"| {s['provider']} | {s['median_s'] * 1e3:,.2f} ms | {s['worst_s'] * 1e3:,.2f} ms | "
                     f"{rel[0]} | {rel[1]} |")
    return lines


def notes(cfg, rows, scans, load) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    found = [f"{NAMES[r['method']]}: {n}" for r in ok for n in r["notes"]]
    scan = next((s for s in scans if s["status"] == "ok"), scans[0])
    return found + [
        "Set-up: each method's own scan and compaction, plus what it makes the user redo: TSTV tokenizes the texts "
        "again with the rewritten tokenizer (its scan tokenizes every whole text, untruncated, one at a time); "
        "upstream rewrites the dataset; PEFT's used ids come from `torch.unique` over the id column (PEFT takes "
        "ids, it has no scan). Merge-back: restore_embeddings / upstream's restore / recreate_vocab / "
        "merge_and_unload.",
        "Peak RSS: not measured (--in-process: every method ran in one process)." if all(
            r["peak_rss_bytes"] is None for r in ok) else
        "Peak RSS: each method runs in a fresh process (`python bench/peers.py --child METHOD`). \"Process\" is "
        "`resource.getrusage(RUSAGE_SELF).ru_maxrss` (imports, data and model included, the same for all); \"above "
        "loaded model\" is Linux VmHWM at the end minus VmRSS after the model and data are loaded, with VmHWM reset "
        "there (`/proc/self/clear_refs` = 5): what set-up, training and merge-back add, the full matrix each "
        "method keeps aside included.",
        "Training state: bytes of the tensors AdamW holds for the trainable parameters after the last step "
        "(weights, gradients, exp_avg, exp_avg_sq), read off the real tensors; frozen weights are in the RSS "
        "columns only. PEFT's trainable rows are its `trainable_tokens_delta`; its forward builds a full [V, D] "
        "copy of the embedding (`index_copy`) every step.",
        "PEFT trainable tokens freezes the rest of the model (`get_peft_model`); the bench unfreezes every other "
        "parameter so that it trains what full fine-tuning trains. PEFT's and TSTV's token rows: the ids of the "
        "truncated training data (PEFT) or of the whole texts plus the special tokens (TSTV); pema_triton keeps "
        "the data's ids plus `special_token_ids`; upstream the data's ids (plus pad, see above).",
        "Upstream PEMA is reimplemented from its published description: its counter is "
        "bench/scan_cases.py's `upstream_counts`; its state_dict hooks (full-size checkpoints while pruned) are not "
        "reimplemented, as the bench saves after merge-back.",
        f"Max abs Δ: every tensor of the final state dict (after merge-back) against full fine-tuning's, same keys "
        f"and shapes required. Step time: median (and worst) of steps 2-{cfg['steps']} (the first pays one-time "
        "allocations), one torch thread (`--threads`), the methods one after another. Wall time counts whatever "
        "else runs on the cores meanwhile; CPU time (`time.process_time`, this process only) leaves out the time it "
        "waited for a core but not the slow-down of sharing caches and memory bandwidth, so on a shared machine "
        "both swing from run to run: pema_triton, upstream and PEFT train the same rows with similar arithmetic, "
        "and their spread is a measure of this run's noise. The memory columns do not move between runs.",
        f"Scan rows: {scan.get('N', 0):,} ids (the articles tokenized to 512 ids, padded), V = {scan.get('V', 0):,}, "
        f"U = {scan.get('U', 0):,}; each provider's ids checked against torch.unique before it is timed; median "
        f"and worst of the rounds (bench/harness.py). The upstream rows are bench/scan_cases.py's providers.",
        f"Load average (1 min) {load[0]:.2f} at the start and {load[1]:.2f} at the end, on a shared machine "
        "(another session may run tests beside it): timings can be affected; memory columns are not.",
    ]


def write(out: Path, cfg, rows, scans, command, load, *, plot: bool = True) -> Path:
    from harness import environment

    out.mkdir(parents=True, exist_ok=True)
    env = environment() | {"versions": versions(), "machine": machine()}
    (out / "peers.json").write_text(json.dumps({"environment": env, "config": cfg, "command": command,
                                                "load_average": load, "methods": rows, "scan": scans}, indent=1) + "\n")
    v = env["versions"]
    lines = ["# pema_triton next to its peers", "",
             f"Generated by `{command}` on {env['machine']}, "
             f"torch threads {cfg.get('threads') or env['torch_threads']}, commit "
             f"{env['git_commit']}. Versions: " + ", ".join(f"{k} {v[k]}" for k in VERSIONS) + ".", "",
             f"all-MiniLM-L6-v2 (`AutoModelForSequenceClassification`, 5 labels) on BBC News topics: "
             f"{cfg['steps']} steps of {cfg['batch_size']} articles truncated to {cfg['max_length']} tokens, AdamW "
             f"lr {cfg['lr']}, weight decay 0, seed {cfg['seed']}, the same batches in the same order for every "
             "method, fp32 on the CPU.", "", *method_lines(rows), "", "## Scanning for the used ids", "",
             *scan_lines(scans), "", "## Notes", "", *[f"- {n}" for n in notes(cfg, rows, scans, load)]]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    if plot:
        figure(out / "peers.png", [r for r in rows if r["status"] == "ok"])
    return out / "peers.md"


def figure(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [NAMES[r["method"]].replace(" (", "\n(") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("training state (MiB)", [r["train_state_bytes"] / MIB for r in rows]),
              ("peak RSS above loaded model (MiB)", [(r["peak_rss_above_loaded_bytes"] or 0) / MIB for r in rows]),
              ("step CPU time, median (ms)", [r["median_step_cpu_s"] * 1e3 for r in rows])]
    for ax, (title, values) in zip(axes, panels):
        bars = ax.barh(names, values, color=["#888888" if r["method"] == "full" else "#3b75af" for r in rows])
        ax.bar_label(bars, fmt="%.0f", padding=2)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.margins(x=0.2)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("all-MiniLM-L6-v2 on BBC News, same steps and data (bench/peers.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
