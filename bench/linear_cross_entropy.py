"""Memory and time of the LM head + loss, forward + backward: the fused loss against what a user would run.

Providers, all on the same hidden states, head and targets (real token ids: U from the model's real tokenizer
over BBC News, so the trainable rows are the ones a fine-tuning run would train):
- `unfused frozen`: pema_triton's `frozen` CompactLMHead ([N, V] logits) + F.cross_entropy.
- `restricted`: the `restricted` head ([N, U] logits, a softmax over the used ids: another objective).
- `fused frozen` / `fused restricted`: pema_triton's fused loss (no logits, a [U, D] head gradient).
- `F.linear_cross_entropy`: torch's fused loss over the full [V, D] head (a [V, D] gradient).
- on a GPU, where installed: Liger's fused linear cross-entropy and Cut Cross-Entropy (both [V, D] gradients).
- `log-probs frozen`: what TRL's SFT asks of its fused LM head (per-token log-probs, entropy, top-1) from pema's
  `compact_linear_log_probs` on the `frozen` head (a [U, D] gradient), beside `TRL log-probs`, TRL's own
  `ChunkedLogProbFunction` over the full head (a [V, D] gradient), where TRL is installed. Loss: the mean NLL.

Each case runs in its own process: peak memory is the process's peak RSS above its resident memory before the
first call on a CPU (measured in a second process whose allocator returns every block of 64 KiB or more on
free), and `torch.cuda.max_memory_allocated` above the inputs on a GPU. Time: median (and worst) of the timed
rounds after a warm-up call.

    python bench/linear_cross_entropy.py            # writes bench/results/linear_cross_entropy_<device>.{json,md}
    python bench/linear_cross_entropy.py --out DIR --budget 360   # (bench/gpu.py head) stops adding cases after 360 s

U comes from bench/.ids (bench/prepare_ids.py) where it was prepared, else from the tokenizer itself. Under
PEMA_GPU_DRY_RUN=1 (bench/gpu.py --dry-run) one tiny synthetic shape runs two providers: no measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH.parent))  # a bare GPU image runs this without pema_triton installed
ON_GPU = torch.cuda.is_available()
DRY_RUN = os.environ.get("PEMA_GPU_DRY_RUN") == "1"
# (name, tokenizer key for U, V, D, token counts). The CPU runs the PyTorch reference on the smallest real shape.
SHAPES = [
    ("SmolLM2-135M", "smollm2-135m", 49152, 576, [4096, 16384, 65536] if ON_GPU else [512, 2048]),
] + ([
    ("Qwen2.5-0.5B (D=2048 head)", "qwen2.5-0.5b", 151936, 2048, [4096, 16384]),
    ("Llama-3-8B", "llama-3-8b", 128256, 4096, [4096, 16384]),
] if ON_GPU else [])
PROVIDERS = ["unfused frozen", "restricted", "fused frozen", "fused restricted", "F.linear_cross_entropy",
             "liger", "cut-cross-entropy", "log-probs frozen", "TRL log-probs"]
_TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL's SFTTrainer asks its fused head for
if DRY_RUN:  # a check that the script runs (CI), every third id of a 4k vocabulary used: not a model's shape
    SHAPES, PROVIDERS = [("tiny (dry run)", None, 4096, 64, [64])], ["unfused frozen", "fused frozen"]


def _used_ids(tokenizer_key: str | None, vocab_size: int) -> torch.Tensor:
    """U from the real tokenizer over BBC News (computed by the parent: tokenizing would set the child's peak)."""
    if tokenizer_key is None:
        return torch.arange(0, vocab_size, 3)
    sys.path.insert(0, str(BENCH))
    from memory import used_fraction_ids

    return used_fraction_ids(tokenizer_key, vocab_size)[0]


def _setup(provider: str, full: torch.Tensor, used: torch.Tensor):
    """What a provider holds before its step (built outside the measured peak): the compacted head, and the
    remap and target-column tables."""
    from pema_triton import CompactLMHead
    from pema_triton.ops import build_remap

    vocab_size, dim = full.shape
    if provider in ("F.linear_cross_entropy", "liger", "cut-cross-entropy", "TRL log-probs"):
        return {"weight": full.detach().clone().requires_grad_()}
    linear = torch.nn.Linear(dim, vocab_size, bias=False, device="meta")  # no transient [V, D] before the peak
    linear.weight = torch.nn.Parameter(full)
    mode = "frozen" if "frozen" in provider else "restricted"
    remap = build_remap(used, vocab_size).to(full.device)
    columns = torch.arange(len(used), dtype=torch.int32, device=full.device)
    return {"head": CompactLMHead(linear, used, output=mode), "mode": mode, "remap": remap, "columns": columns}


def _step(provider: str, held: dict, hidden, targets):
    """One forward + backward of `provider`; returns (loss, the head gradient's shape)."""
    from pema_triton.ops import compact_linear_cross_entropy, compact_linear_log_probs

    h = hidden.detach().requires_grad_()
    if "head" in held:
        head, frozen_mode = held["head"], held["mode"] == "frozen"
        head.weight.grad = None
        target = targets if frozen_mode else held["remap"][targets].long()
        if provider == "log-probs frozen":
            loss = -compact_linear_log_probs(h, head.weight, head.frozen_weight, head.used_ids, target,
                                             outputs=_TRL_OUTPUTS)["log_probs"].mean()
        elif provider.startswith("fused"):
            frozen = head.frozen_weight if frozen_mode else head.weight
            loss = compact_linear_cross_entropy(h, head.weight, frozen, held["remap" if frozen_mode else "columns"],
                                                target)
        else:
            loss = F.cross_entropy(head(h).float(), target)
        loss.backward()
        return loss, tuple(head.weight.grad.shape)
    weight = held["weight"]
    weight.grad = None
    if provider == "F.linear_cross_entropy":
        loss = F.linear_cross_entropy(h, weight, targets)
    elif provider == "TRL log-probs":
        from trl.kernels import ChunkedLogProbFunction

        log_probs = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 32768, None, 1.0, _TRL_OUTPUTS)[0]
        loss = -log_probs.mean()
    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()(weight, h, targets)
    else:
        from cut_cross_entropy import linear_cross_entropy

        loss = linear_cross_entropy(h, weight, targets)
    loss.backward()
    return loss, tuple(weight.grad.shape)


def run_one(provider: str, shape: int, num_tokens: int, rounds: int, used_file: str) -> dict:
    name, key, vocab_size, dim, _ = SHAPES[shape]
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    used = torch.load(used_file)
    gen = torch.Generator().manual_seed(0)
    full = (torch.randn(vocab_size, dim, generator=gen) * dim**-0.5).to(device, dtype)
    hidden = torch.randn(num_tokens, dim, generator=gen).to(device, dtype)
    targets = used[torch.randint(0, len(used), (num_tokens,), generator=gen)].to(device)  # real ids: used ones
    held = _setup(provider, full, used)
    base = torch.cuda.memory_allocated() if ON_GPU else _resident_bytes()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(rounds + 1):  # the first call warms up (and compiles)
        if ON_GPU:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, grad_shape = _step(provider, held, hidden, targets)
        if ON_GPU:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if ON_GPU
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"model": name, "provider": provider, "N": num_tokens, "D": dim, "V": vocab_size, "U": len(used),
            "dtype": str(dtype), "loss": float(loss), "median_s": statistics.median(times),
            "worst_s": max(times), "peak_bytes": peak, "head_grad_shape": list(grad_shape),
            "logits_bytes_unfused": num_tokens * vocab_size * 4}


def _resident_bytes() -> int:
    """This process's resident memory now (its peak is `ru_maxrss`)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def available(provider: str) -> bool:
    if provider in ("liger", "cut-cross-entropy"):
        if not ON_GPU:
            return False
        module = "liger_kernel" if provider == "liger" else "cut_cross_entropy"
        return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0
    if provider == "TRL log-probs":
        return subprocess.run([sys.executable, "-c", "from trl.kernels import ChunkedLogProbFunction"],
                              capture_output=True).returncode == 0
    return provider != "F.linear_cross_entropy" or hasattr(F, "linear_cross_entropy")


def _measure(cmd: list[str], case: dict) -> dict:
    """Time from one process; on a CPU, peak memory from a second one whose allocator maps every block of 64 KiB
    or more on its own (glibc's default raises that threshold as blocks are freed and keeps them resident, so the
    peak RSS would count freed blocks). A failing case is a row that says so, not the end of the run."""
    rows = []
    envs = [None] if ON_GPU else [None, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")]
    for env in envs:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return case | {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:120]}
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows[0] | {"peak_bytes": rows[-1]["peak_bytes"]}


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | N | provider | head gradient | peak memory | vs unfused frozen | time | vs unfused frozen "
             "| loss |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["N"] == row["N"]
                     and r["provider"] == "unfused frozen" and "error" not in r), None)
        if "error" in row or "skipped" in row:
            why = f"failed: {row['error']}" if "error" in row else f"skipped: {row['skipped']}"
            lines.append(f"| {row['model']} | {row['N']:,} | {row['provider']} | {why} | | | | | |")
            continue
        mem = f"{row['peak_bytes'] / 2**20:,.0f} MiB"
        rel_mem = f"{row['peak_bytes'] / base['peak_bytes']:.1%}" if base else ""
        rel_time = f"{row['median_s'] / base['median_s']:.2f}x" if base else ""
        lines.append(f"| {row['model']} | {row['N']:,} | {row['provider']} | {row['head_grad_shape']} | {mem} | "
                     f"{rel_mem} | {row['median_s'] * 1e3:,.0f} ms | {rel_time} | {row['loss']:.4f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", nargs=4, metavar=("PROVIDER", "SHAPE", "N", "USED"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=10 if ON_GPU else 3)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default bench/results)")
    p.add_argument("--stem", help="file name of the results, without suffix (default linear_cross_entropy_<device>)")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds after which no case is started")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.rounds, args.one[3])))
        return
    rows = []
    scratch = Path(tempfile.mkdtemp())
    start = time.monotonic()
    for index, (name, key, vocab_size, _, token_counts) in enumerate(SHAPES):
        used_file = scratch / f"used_{index}.pt"
        torch.save(_used_ids(key, vocab_size), used_file)
        for num_tokens in token_counts:
            for provider in filter(available, PROVIDERS):
                case = {"model": name, "provider": provider, "N": num_tokens}
                if time.monotonic() - start > args.budget:
                    rows.append(case | {"skipped": f"time budget of {args.budget:.0f} s spent"})
                    continue
                cmd = [sys.executable, __file__, "--one", provider, str(index), str(num_tokens), str(used_file),
                       "--rounds", str(args.rounds)]
                rows.append(_measure(cmd, case))
                print(table([r for r in rows if r["model"] == name and r["N"] == num_tokens])[-1], flush=True)
    tag = torch.cuda.get_device_name().replace(" ", "_") if ON_GPU else "cpu"
    sys.path.insert(0, str(BENCH))
    import harness

    env = harness.environment() | {"device": tag}
    stem = args.stem or f"linear_cross_entropy_{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    lines = [f"# Head + loss, forward + backward ({tag})", "",
             f"Measured by `python bench/linear_cross_entropy.py`: torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, Python {env['python']}, commit {env['git_commit']}.", "", *table(rows)]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
