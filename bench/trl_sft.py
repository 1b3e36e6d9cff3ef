"""SFT of SmolLM2-135M-Instruct on BBC News through TRL's SFTTrainer, with and without `compact_trainer`: training
state, peak memory, step time and losses, each run in a process of its own (its peak RSS is its own).

    python bench/trl_sft.py          # bench/results/trl_sft_<device>.{json,md}

Both runs are examples/trl_sft.py (`--run pema`, `--run baseline`): the baseline is the same SFT run on the
uncompacted model with the rows PEMA compacts away frozen by a gradient hook, so the losses must agree to round-off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
EXAMPLE = BENCH.parent / "examples" / "trl_sft.py"
sys.path[:0] = [str(BENCH)]
STEPS, ARTICLES = 6, 24
RUNS = ("pema", "baseline")


def run(which: str, folder: Path) -> dict:
    out = folder / f"{which}.json"
    subprocess.run([sys.executable, str(EXAMPLE), "--run", which, "--steps", str(STEPS), "--articles",
                    str(ARTICLES), "--json", str(out)], check=True)
    result = json.loads(out.read_text())
    return {**result[which], "peak_rss_bytes": result["peak_rss_bytes"], "args": result["args"]}


def table(result: dict) -> list[str]:
    mib = 2**20
    rows = ["| run | weights+buffers | gradients | optimizer | training state | peak RSS | peak CUDA | s/step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in RUNS:
        r = result[name]
        cuda = "n/a" if r["peak_cuda_bytes"] is None else f"{r['peak_cuda_bytes'] / mib:,.0f} MiB"
        rows.append(f"| {name} | {r['weights_bytes'] / mib:,.0f} MiB | {r['gradients_bytes'] / mib:,.0f} MiB | "
                    f"{r['optimizer_bytes'] / mib:,.0f} MiB | {r['training_state_bytes'] / mib:,.0f} MiB | "
                    f"{r['peak_rss_bytes'] / mib:,.0f} MiB | {cuda} | {r['mean_step_seconds']:.2f} |")
    return rows


def render(result: dict) -> str:
    env, pema = result["environment"], result["pema"]["pema"]
    diff = max(abs(a - b) for a, b in zip(result["pema"]["losses"], result["baseline"]["losses"], strict=True))
    return "\n".join([
        f"SFT of SmolLM2-135M-Instruct on {ARTICLES} BBC News articles, {STEPS} AdamW steps of 2 x 256 tokens, fp32, "
        f"TRL {result['trl']}; device {env['device']}, torch {env['torch']}, commit {env['git_commit']}.",
        "",
        *table(result),
        "",
        f"- U = {pema['num_used']:,} of V = {pema['vocab_size']:,} rows ({pema['num_used'] / pema['vocab_size']:.1%}), "
        f"`output=\"{pema['output']}\"`; the largest loss difference between the runs: {diff:.1e}.",
        "- Counted after the last step (gradients freed by the Trainer's zero_grad); peak RSS is each process's own,",
        "  the model load and TRL's tokenization included.",
        "",
    ])


def main() -> int:
    import harness
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        result = {name: run(name, Path(tmp)) for name in RUNS}
    result.update(environment=harness.environment(), trl=trl.__version__)
    stem = f"trl_sft_{harness.device_slug()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
