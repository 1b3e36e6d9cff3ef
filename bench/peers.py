"""pema_triton next to its peers: one model, one dataset, the same steps, five methods (bench/peer_methods.py).

all-MiniLM-L6-v2 (`AutoModelForSequenceClassification`, 5 labels) fine-tuned on BBC News topics with AdamW
(weight decay 0), the same seed, data order and hyper-parameters, by plain full fine-tuning, pema_triton,
transformer-smaller-training-vocab (TSTV), PEFT trainable tokens and upstream PEMA (reimplemented). Each method
runs in its own process, so its peak RSS is its own. Per method: max |Δ| of every final weight (after the method's
merge-back) against full fine-tuning, trainable parameters, AdamW training state, peak RSS, median step time,
set-up and merge-back time, and what a user must rewrite. Then the scan rows: pema_triton's `scan_vocabulary`,
upstream's real counter and `torch.unique` on all of BBC News tokenized to 512 ids an article.

    python bench/peers.py                   # ~3 minutes on 2 CPU cores
    python bench/peers.py --steps 2 --batch-size 2 --max-length 16 --scan-articles 64 --out /tmp/peers
Writes bench/results/peers.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH), str(BENCH.parent / "examples")]
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from peer_methods import NAMES  # noqa: E402

RESULTS = BENCH / "results"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Linux: writing "5" to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_data(cfg, tokenizer):
    import assets
    from peer_methods import tokenize

    (texts, labels), _, _ = assets.load_bbc_news(cfg["steps"] * cfg["batch_size"], 0, seed=cfg["seed"])
    return {"texts": texts, "labels": labels, "dataset": tokenize(tokenizer, texts, labels, cfg["max_length"])}


def train(model, batches, cfg) -> dict:
    """AdamW over the fixed batches; the training state is read off the real tensors after the last step."""
    from memory import tensor_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    model.train()
    times, cpu, losses = [], [], []
    for batch in batches:
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, so their bytes are counted
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(loss.item())
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return {"trainable": sum(p.numel() for p in params), "train_state_bytes": tensor_bytes(params)
            + tensor_bytes(p.grad for p in params) + tensor_bytes(moments),
            # the first step pays one-time allocations and thread-pool start-up: the median is of the others
            "median_step_s": float(torch.tensor(times[1:] or times).median()), "step_s": times, "losses": losses,
            # CPU time of this process: on a shared machine wall time also counts the others' time slices
            "median_step_cpu_s": float(torch.tensor(cpu[1:] or cpu).median()), "step_cpu_s": cpu}


def child(method: str, cfg: dict, state_path: str) -> dict:
    """One method in this process: load, set up, train, merge back, save the final state dict."""
    import transformers
    from assets import minilm_dir
    from peer_methods import METHODS

    transformers.logging.set_verbosity_error()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    data = load_data(cfg, tokenizer)
    torch.manual_seed(cfg["seed"])  # the same fresh classifier head in every method
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5)
    rss_loaded, reset = _status_kib("VmRSS"), _reset_peak_rss()
    start = time.perf_counter()
    prepared = METHODS[method](model, tokenizer, data, cfg)
    setup_s = time.perf_counter() - start
    torch.manual_seed(cfg["seed"])  # the same dropout masks, whatever set-up drew
    record = train(prepared.model, prepared.batches[: cfg["steps"]], cfg)
    start = time.perf_counter()
    final = prepared.finish()
    merge_s = time.perf_counter() - start
    peak_above = (_status_kib("VmHWM") - rss_loaded) * 1024 if reset and rss_loaded else None
    torch.save(final.state_dict(), state_path)
    return record | {"method": method, "setup_s": setup_s, "merge_s": merge_s, "rows": prepared.rows,
                     "V": len(tokenizer), "notes": prepared.notes, "peak_rss_above_loaded_bytes": peak_above,
                     # ru_maxrss: KiB on Linux; the whole process, imports and the loaded model included
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_one(method: str, cfg: dict, state: Path, in_process: bool) -> dict:
    """One method in a fresh process (its peak RSS its own), or here (`in_process`: no RSS, a quick check)."""
    if in_process:
        record = child(method, cfg, str(state))
        return record | {"peak_rss_bytes": None, "peak_rss_above_loaded_bytes": None, "status": "ok"}
    out = subprocess.run([sys.executable, __file__, "--child", method, "--config", json.dumps(cfg),
                          "--state", str(state)], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"method": method, "status": "FAILED", "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"status": "ok"}


def run_methods(cfg: dict, methods: list[str], root: Path, in_process: bool = False) -> list[dict]:
    """Every method, then max |Δ| of every final weight against full fine-tuning's."""
    rows = []
    for method in methods:
        state = root / f"{method}.pt"
        rows.append(run_one(method, cfg, state, in_process) | {"state": str(state)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("step_s", "step_cpu_s", "losses")}),
              flush=True)
    reference = next((r for r in rows if r["method"] == "full" and r["status"] == "ok"), None)
    ref = torch.load(reference["state"]) if reference else None
    for r in rows:
        state = r.pop("state")
        if r["status"] == "ok" and ref is not None:
            r.update(compare(ref, torch.load(state)))
    return rows


def compare(ref: dict, got: dict) -> dict:
    """max |Δ| over every tensor of the state dict; a key or shape that differs is reported, not compared."""
    if ref.keys() != got.keys():
        return {"max_abs_diff": None, "diff_error": f"keys differ: {sorted(ref.keys() ^ got.keys())[:4]}"}
    bad = [k for k in ref if ref[k].shape != got[k].shape]
    if bad:
        return {"max_abs_diff": None, "diff_error": f"shapes differ: {bad[:4]}"}
    diffs = {k: (ref[k].double() - got[k].double()).abs().max().item() if ref[k].numel() else 0.0 for k in ref}
    worst = max(diffs, key=diffs.get)
    return {"max_abs_diff": diffs[worst], "worst_tensor": worst,
            "bit_identical": all(torch.equal(ref[k], got[k]) for k in ref)}


def scan_rows(articles: int | None, rounds: int) -> list[dict]:
    """pema_triton's scan, upstream's counter and torch.unique on all of BBC News, 512 ids an article (the
    model's limit, padded as upstream's example pads), each checked against torch.unique before it is timed."""
    import datasets
    import transformers
    from assets import load_bbc_news, minilm_dir
    from harness import measure
    from scan_cases import scan_provider

    from pema_triton import scan_vocabulary

    datasets.disable_progress_bars()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    (texts, _), _, _ = load_bbc_news(articles or 2225, 0)
    ids = torch.tensor(tokenizer(texts, truncation=True, max_length=512, padding="max_length")["input_ids"])
    V, flat, expected = len(tokenizer), ids.flatten(), torch.unique(ids)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.numpy()})

    def check(out):
        if not torch.equal(torch.as_tensor(out).long(), expected):
            raise AssertionError(f"{len(out)} used ids, torch.unique finds {len(expected)}, or they differ")

    providers = {
        "pema_triton scan_vocabulary(Dataset)": lambda: (lambda: scan_vocabulary(dataset, V, progress=False), check),
        "pema_triton scan_vocabulary(tensor)": lambda: (lambda: scan_vocabulary(flat, V, progress=False), check),
        "upstream counter (numpy datasets.map + np.bincount)":
            lambda: scan_provider("numpy-bincount-datasets.map", flat, V, expected),
        "upstream's core alone (np.bincount on the id matrix)":
            lambda: scan_provider("numpy-bincount", flat, V, expected),
        "torch.unique": lambda: (lambda: torch.unique(flat), check),
    }
    base = {"op": "scan", "case": f"bbc-minilm-{len(texts)}x512", "N": flat.numel(), "V": V, "U": len(expected)}
    return [measure(base | {"provider": name}, make, floor_bytes=flat.numel() * 8 + len(expected) * 8, rounds=rounds)
            for name, make in providers.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(NAMES), choices=list(NAMES))
    p.add_argument("--scan-articles", type=int, default=None, help="articles for the scan rows (default: all 2,225)")
    p.add_argument("--scan-rounds", type=int, default=5)
    # One thread by default: on this shared 2-core machine, with other jobs running, 2-thread MiniLM steps took
    # 2-8 s against 0.6-0.9 s with one thread (B = 8, T = 64), and varied run to run by the same factor.
    p.add_argument("--threads", type=int, default=1, help="torch threads in each method's process (0: torch's)")
    p.add_argument("--in-process", action="store_true",
                   help="run the methods in this process (a quick exactness check: no per-method peak RSS)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.config), args.state)))
        return 0
    from peer_report import write

    if args.threads:
        torch.set_num_threads(args.threads)  # the scan rows, timed here
    cfg = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
           "seed": args.seed, "threads": args.threads}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        rows = run_methods(cfg, args.methods, Path(root), in_process=args.in_process)
    scans = scan_rows(args.scan_articles, args.scan_rounds)
    command = "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(args.out, cfg, rows, scans, command.strip(), (load_before, os.getloadavg()[0]), plot=not args.no_plot)
    return 0 if all(r["status"] == "ok" for r in rows + scans) else 1


if __name__ == "__main__":
    sys.exit(main())
