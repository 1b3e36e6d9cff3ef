"""Memory and time of the LM head + loss, forward + backward: the fused loss against what a user would run.

Providers, all on the same hidden states, head and targets (real token ids: U from the model's real tokenizer
over BBC News, so the trainable rows are the ones a fine-tuning run would train):
- `unfused frozen`: pema_triton's `frozen` CompactLMHead ([N, V] logits) + F.cross_entropy.
- `restricted`: the `restricted` head ([N, U] logits, a softmax over the used ids: another objective).
- `fused frozen` / `fused restricted`: pema_triton's fused loss (no logits, a [U, D] head gradient).
- `F.linear_cross_entropy`: torch's fused loss over the full [V, D] head (a [V, D] gradient).
- on a GPU, where installed: Liger's fused linear cross-entropy and Cut Cross-Entropy (both [V, D] gradients).
- `log-probs frozen`: what TRL's SFT asks of its fused LM head (per-token log-probs, entropy, top-1) from pema's
  `compact_linear_log_probs` on the `frozen` head (a [U, D] gradient; the uniform-gradient hint TRL's adapter
  keeps, which the mean NLL fulfils), beside `TRL log-probs`, TRL's own
  `ChunkedLogProbFunction` over the full head (a [V, D] gradient), where TRL is installed. Loss: the mean NLL.

Each case runs in its own process: peak memory is the process's peak RSS above its resident memory before the
first call on a CPU (measured in a second process whose allocator returns every block of 64 KiB or more on
free), and `torch.cuda.max_memory_allocated` above the inputs on a GPU. Time: median (and worst) of the timed
rounds after a warm-up call.

    python bench/linear_cross_entropy.py            # writes bench/results/linear_cross_entropy_<device>.{json,md}
    python bench/linear_cross_entropy.py --out DIR --budget 360   # (bench/gpu.py head) stops adding cases after 360 s
    python bench/linear_cross_entropy.py --shape 151936 4096 qwen2.5-0.5b --tokens 8192 32768 \
        --providers "fused frozen" liger --deadline 230             # one shape, these providers (bench/first_hour.py)

U comes from bench/.ids (bench/prepare_ids.py) where it was prepared, else from the tokenizer itself, else (a bare
GPU image without bench/.ids) synthetic: a quarter of V at random, as bench/ids.py's Zipf source; the notes say
which. A case that runs out of device memory is a row that says so, not a failure. Under PEMA_GPU_DRY_RUN=1
(bench/gpu.py --dry-run) one tiny synthetic shape runs two providers (or --providers): no measurement.
"""

from __future__ import annotations

import argparse
import functools
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
PROVIDERS = ALL_PROVIDERS = ["unfused frozen", "restricted", "fused frozen", "fused restricted",
                             "F.linear_cross_entropy", "liger", "cut-cross-entropy", "log-probs frozen",
                             "TRL log-probs"]
# What `available` imports in a child process, as `_step` does (a failing import is the row's reason).
_IMPORTS = {"liger": "from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss",
            "cut-cross-entropy": "from cut_cross_entropy import linear_cross_entropy",
            "TRL log-probs": "from trl.kernels import ChunkedLogProbFunction"}
_TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL's SFTTrainer asks its fused head for
if DRY_RUN:  # a check that the script runs (CI), every third id of a 4k vocabulary used: not a model's shape
    SHAPES, PROVIDERS = [("tiny (dry run)", None, 4096, 64, [64])], ["unfused frozen", "fused frozen"]


def _used_ids(tokenizer_key: str | None, vocab_size: int) -> tuple[torch.Tensor, str]:
    """U and whence: the real tokenizer over BBC News (computed by the parent: tokenizing would set the child's
    peak), else synthetic (see memory.used_ids_and_batch); `zipf` asks for the synthetic U."""
    if tokenizer_key is None:
        return torch.arange(0, vocab_size, 3), "every third id (a dry run's tiny shape)"
    sys.path.insert(0, str(BENCH))
    from ids import ZIPF_SHARE, synthetic_used
    from memory import used_ids_and_batch

    if tokenizer_key == "zipf":
        used = synthetic_used(vocab_size)
        return used, f"synthetic: {len(used):,} random ids ({ZIPF_SHARE:.0%} of V, as bench/ids.py's Zipf source)"
    used, _, _, source = used_ids_and_batch(tokenizer_key, vocab_size)
    return used, source


def _setup(provider: str, full: torch.Tensor, used: torch.Tensor):
    """What a provider holds before its step (built outside the measured peak): the compacted head, and the
    remap table from ids to its columns (`restricted`'s targets)."""
    from pema_triton import CompactLMHead
    from pema_triton.ops import build_remap
    from pema_triton.ops.linear_log_probs import UniformGradHint

    vocab_size, dim = full.shape
    if provider in ("F.linear_cross_entropy", "liger", "cut-cross-entropy", "TRL log-probs"):
        return {"weight": full.detach().clone().requires_grad_()}
    linear = torch.nn.Linear(dim, vocab_size, bias=False, device="meta")  # no transient [V, D] before the peak
    linear.weight = torch.nn.Parameter(full)
    mode = "frozen" if "frozen" in provider else "restricted"
    remap = build_remap(used, vocab_size).to(full.device)
    # The hint TRL's adapter keeps across steps (pema_triton.fused_lm_head): SFT's mean NLL is a uniform gradient.
    return {"head": CompactLMHead(linear, used, output=mode), "mode": mode, "remap": remap,
            "hint": UniformGradHint()}


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
                                             outputs=_TRL_OUTPUTS, uniform_grad_hint=held["hint"])["log_probs"].mean()
        elif provider.startswith("fused"):
            full, used = (head.frozen_weight, head.used_ids) if frozen_mode else (None, None)
            loss = compact_linear_cross_entropy(h, head.weight, full, used, target)
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


def run_one(provider: str, shape: tuple, num_tokens: int, rounds: int, used_file: str) -> dict:
    name, key, vocab_size, dim, _ = shape
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    used = torch.load(used_file)
    # Drawn on the device: a [151,936, 4,096] head drawn on the CPU and copied takes seconds of every case's process.
    gen = torch.Generator(device=device).manual_seed(0)
    full = (torch.randn(vocab_size, dim, generator=gen, device=device) * dim**-0.5).to(dtype)
    hidden = torch.randn(num_tokens, dim, generator=gen, device=device).to(dtype)
    targets = used.to(device)[torch.randint(0, len(used), (num_tokens,), generator=gen, device=device)]  # used ids
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
    return unavailable(provider) is None


@functools.cache
def unavailable(provider: str) -> str | None:
    """Why `provider` cannot run here (None: it can); an import is tried once, in a child process."""
    if provider == "F.linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    if provider not in _IMPORTS:
        return None
    if provider != "TRL log-probs" and not ON_GPU:
        return "CUDA kernels: needs a GPU"
    result = subprocess.run([sys.executable, "-c", _IMPORTS[provider]], capture_output=True, text=True)
    return None if result.returncode == 0 else f"not importable: {(result.stderr.strip().splitlines() or ['?'])[-1]}"


def _measure(cmd: list[str], case: dict, timeout: float | None = None) -> dict:
    """Time from one process; on a CPU, peak memory from a second one whose allocator maps every block of 64 KiB
    or more on its own (glibc's default raises that threshold as blocks are freed and keeps them resident, so the
    peak RSS would count freed blocks; a dry run skips it). A failing case is a row that says so, not the end of
    the run; one out of device memory is marked `oom`, one past `timeout` is skipped."""
    rows = []
    envs = [None] if ON_GPU or DRY_RUN else [None, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")]
    for env in envs:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return case | {"skipped": f"stopped after {timeout:.0f} s (--deadline)"}
        if result.returncode != 0:
            error = (result.stderr.strip().splitlines() or ["?"])[-1][:160]
            oom = "OutOfMemoryError" in error or "out of memory" in error.lower()
            return case | {"error": error} | ({"oom": True} if oom else {})
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows[0] | {"peak_bytes": rows[-1]["peak_bytes"]}


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | N | provider | head gradient | peak memory | vs unfused frozen | time | vs unfused frozen "
             "| loss |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["N"] == row["N"]
                     and r["provider"] == "unfused frozen" and "median_s" in r), None)
        if "error" in row or "skipped" in row or "unavailable" in row:
            why = (f"{'does not fit in memory' if row.get('oom') else 'failed'}: {row['error']}" if "error" in row
                   else f"skipped: {row['skipped']}" if "skipped" in row else f"unavailable: {row['unavailable']}")
            lines.append(f"| {row['model']} | {row['N']:,} | {row['provider']} | {why} | | | | | |")
            continue
        mem = f"{row['peak_bytes'] / 2**20:,.0f} MiB"
        rel_mem = f"{row['peak_bytes'] / base['peak_bytes']:.1%}" if base else ""
        rel_time = f"{row['median_s'] / base['median_s']:.2f}x" if base else ""
        lines.append(f"| {row['model']} | {row['N']:,} | {row['provider']} | {row['head_grad_shape']} | {mem} | "
                     f"{rel_mem} | {row['median_s'] * 1e3:,.0f} ms | {rel_time} | {row['loss']:.4f} |")
    return lines


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", nargs=4, metavar=("PROVIDER", "SHAPE", "N", "USED"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=10 if ON_GPU else 3)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default bench/results)")
    p.add_argument("--stem", help="file name of the results, without suffix (default linear_cross_entropy_<device>)")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds after which no case is started")
    p.add_argument("--shape", nargs=3, metavar=("V", "D", "IDS"),
                   help="one head shape instead of the default ones: V, D, and the tokenizer key U comes from "
                        "(zipf: synthetic)")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts N of --shape (default 4096)")
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS,
                   help="these, in this order (default: every one that runs here); one that cannot is a row")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds after which a running case is stopped (a skipped row)")
    return p.parse_args(argv)


def _shapes(args) -> list[tuple]:
    if not args.shape:
        return SHAPES
    vocab_size, dim, key = int(args.shape[0]), int(args.shape[1]), args.shape[2]
    return [(f"V={vocab_size:,}, D={dim:,}", key, vocab_size, dim, args.tokens or [4096])]


def _case(args, provider: str, shape_index: int, num_tokens: int, used_file: Path, case: dict, start: float) -> dict:
    """One row: the case measured in its own process, or why it was not."""
    if unavailable(provider):
        return case | {"unavailable": unavailable(provider)}
    if time.monotonic() - start > args.budget:
        return case | {"skipped": f"time budget of {args.budget:.0f} s spent"}
    left = args.deadline - (time.monotonic() - start)  # a slow first compile may use the others' time, not more
    if left < 5:
        return case | {"skipped": f"deadline of {args.deadline:.0f} s reached"}
    cmd = [sys.executable, __file__, "--one", provider, str(shape_index), str(num_tokens), str(used_file),
           "--rounds", str(args.rounds)]
    if args.shape:  # the child finds the shape by its index in the same list
        cmd += ["--shape", *args.shape] + (["--tokens", *map(str, args.tokens)] if args.tokens else [])
    return _measure(cmd, case, left if left < float("inf") else None)


def main(argv=None):
    args = _args(argv)
    shapes = _shapes(args)
    if args.one:
        shape = shapes[int(args.one[1])]
        print(json.dumps(run_one(args.one[0], shape, int(args.one[2]), args.rounds, args.one[3])))
        return 0
    sys.path.insert(0, str(BENCH))
    import harness

    tag = torch.cuda.get_device_name().replace(" ", "_") if ON_GPU else "cpu"
    env = harness.environment() | {"device": tag}
    rows, notes = [], []
    scratch = Path(tempfile.mkdtemp())
    start = time.monotonic()
    try:
        for index, (name, key, vocab_size, _, token_counts) in enumerate(shapes):
            used, source = _used_ids(key, vocab_size)
            notes.append(f"{name}: U = {len(used):,} used ids: {source}.")
            torch.save(used, used_file := scratch / f"used_{index}.pt")
            for num_tokens in token_counts:
                for provider in args.providers or list(filter(available, PROVIDERS)):
                    case = {"model": name, "provider": provider, "N": num_tokens}
                    rows.append(_case(args, provider, index, num_tokens, used_file, case, start))
                    print(table([r for r in rows if r["model"] == name and r["N"] == num_tokens])[-1], flush=True)
                    _write(args, env, rows, notes)  # after each case: a run killed from outside keeps its rows
    except KeyboardInterrupt:  # Ctrl-C, or bench/first_hour.py at its time limit: the rows so far are the table
        notes.append("Interrupted (SIGINT): the cases after the last row did not run.")
    print("\n".join(_write(args, env, rows, notes)))
    return 1 if any("error" in r and not r.get("oom") for r in rows) else 0


def _write(args, env: dict, rows: list[dict], notes: list[str]) -> list[str]:
    stem = args.stem or f"linear_cross_entropy_{env['device']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows, "notes": notes}, indent=1))
    lines = [f"# Head + loss, forward + backward ({env['device']})", "",
             f"Measured by `python bench/linear_cross_entropy.py`: torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, Python {env['python']}, commit {env['git_commit']}.", "", *table(rows)]
    if any(r["provider"] in ("liger", "cut-cross-entropy") for r in rows):
        notes = [*notes, "Liger (LigerFusedLinearCrossEntropyLoss) and Cut Cross-Entropy (linear_cross_entropy) run "
                 "with their defaults: CCE's filter_eps='high' skips the backward of vocabulary blocks whose softmax "
                 "values all lie below 2^-12 (bf16's eps / 32); pema's fused loss skips none."]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(main())
