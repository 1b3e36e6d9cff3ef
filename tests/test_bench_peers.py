"""bench/peers.py in a tiny configuration: every peer runs its real code path, and each one that claims to equal
full fine-tuning on the input embedding (all five do, with weight decay 0) ends with the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each peer in its own process (~15 s): `make test-all`

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_every_method_ends_bit_identical_to_full_fine_tuning(tmp_path):
    """2 steps of 2 BBC News articles at 16 tokens, every method in this one process (--in-process: ~25 s on 2
    cores rather than ~2 min for five fresh processes). The bar is exact equality, not a tolerance: each method
    trains the same rows with the same per-row arithmetic (an unused row gets no gradient, so AdamW with weight
    decay 0 never moves it), and on this CPU all five were bit-identical to full fine-tuning."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path users get
    result = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--steps", "2", "--batch-size", "2",
                             "--max-length", "16", "--scan-articles", "8", "--scan-rounds", "1", "--in-process",
                             "--no-plot", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == {"full", "pema_triton", "tstv", "peft", "upstream"}
    for method, r in rows.items():
        assert r["status"] == "ok", (method, r.get("error"))
        assert r["max_abs_diff"] == 0.0 and r["bit_identical"], (method, r["max_abs_diff"], r.get("worst_tensor"))
    full = rows["full"]["train_state_bytes"]
    assert all(rows[m]["train_state_bytes"] < full for m in rows if m != "full")  # compaction shrank the state
    assert any("Reassigning `pad_token`" in n for n in rows["upstream"]["notes"])  # upstream's refusal reproduced
    assert {s["status"] for s in report["scan"]} == {"ok"}  # each scan provider's ids equal torch.unique's
    assert "| pema_triton |" in (tmp_path / "peers.md").read_text()


def test_the_weight_comparison_sees_one_changed_element():
    """The check the test above relies on: max |Δ| and bit-identity notice a single element off by 1e-7."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from peers import compare
    finally:
        sys.path.remove(str(BENCH))
    ref = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    got = {k: v.clone() for k, v in ref.items()}
    got["b"][2] += 1e-7
    out = compare(ref, got)
    assert not out["bit_identical"] and out["worst_tensor"] == "b" and 0 < out["max_abs_diff"] < 2e-7
    assert compare(ref, {"a": ref["a"]})["max_abs_diff"] is None  # a missing tensor is an error, not a pass
