"""The README's demo runs end to end at a small size, and its exactness checks pass (exit code 0).

Under the test session's TRITON_INTERPRET=1 the compact embeddings run the Triton kernels on real models.
"""

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_runs_and_pema_equals_its_baselines():
    import real_assets

    real_assets.minilm_dir()  # skipped (or failing under PEMA_REQUIRE_ASSETS) without the offline assets
    args = ["--train", "32", "--test", "16", "--max-length", "64", "--lm-steps", "2", "--lm-seq-len", "32"]
    result = subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=900,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Triton kernels" in out or "PyTorch reference" in out
    assert "| PEMA (input embedding) |" in out and "0 (full fine-tuning)" in out
    assert "| PEMA frozen |" in out and "0 (hook baseline)" in out and "| PEMA restricted |" in out
