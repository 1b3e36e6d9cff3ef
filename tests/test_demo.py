"""The README's demo runs end to end at a small size, and its exactness checks pass (exit code 0).

Under the test session's TRITON_INTERPRET=1 the compact embeddings run the Triton kernels on real models.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the whole demo on real MiniLM and SmolLM2 (~90 s): `make test-all`

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_runs_and_pema_equals_its_baselines(tmp_path):
    from helpers import real_assets

    real_assets.minilm_dir()  # skipped (or failing under PEMA_REQUIRE_ASSETS) without the offline assets
    args = ["--train", "32", "--test", "16", "--max-length", "64", "--lm-steps", "2", "--lm-seq-len", "32"]
    result = subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=900,
                            env=os.environ | {"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Triton kernels" in out or "PyTorch reference" in out

    def differences(run):
        """The row's two last cells: max |Δ| vs full fine-tuning, and vs its exact baseline (value, name)."""
        cells = re.search(rf"^\| {re.escape(run)} \|.*\| ([^|]*) \| ([^|]*) \|$", out, re.M).groups()
        vs_baseline = re.fullmatch(r"(\S+) \((.+)\)", cells[1])
        return float(cells[0]), float(vs_baseline[1]), vs_baseline[2]

    # Bit for bit on CPU (the interpreter's atomics do not race); GPU atomics reorder sums: round-off there.
    exact_bound = 0.0 if not torch.cuda.is_available() else 1e-4
    assert differences("PEMA (input embedding)") == (pytest.approx(0.0, abs=exact_bound),) * 2 + ("full fine-tuning",)
    full, frozen, baseline = differences("PEMA frozen")
    assert baseline == "hook baseline" and frozen <= exact_bound and full > 0  # full FT also trains unused head rows
    full, restricted, baseline = differences("PEMA restricted")
    assert baseline == "hook + mask baseline" and restricted < 1e-3 and full > 0
    full, fused, baseline = differences("PEMA frozen + fused loss")  # no logits: the frozen objective, round-off
    assert baseline == "hook baseline" and fused < 1e-3 and full > 0

    # Deploy: the trimmed classifier reloads in plain transformers, smaller, with the full model's test accuracy.
    deploy = re.findall(r"^\| (full|trimmed) \| ([\d.,]+) MiB \| ([\d,]+) \| ([\d.]+) \|$", out, re.M)
    rows = {name: cells for name, *cells in deploy}
    (full_mib, full_vocab, full_acc), (trim_mib, trim_vocab, trim_acc) = rows["full"], rows["trimmed"]
    assert float(trim_acc) == float(full_acc)
    assert float(trim_mib.replace(",", "")) < float(full_mib.replace(",", ""))
    assert int(trim_vocab.replace(",", "")) < int(full_vocab.replace(",", ""))
    assert not list(tmp_path.glob("pema_deploy_*"))  # the demo's own copies (134 MB a run) are removed
