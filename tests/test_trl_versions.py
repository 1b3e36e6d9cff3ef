"""Three TRL behaviours, each a fresh process with that TRL first on the path (scripts/setup.sh installs the older
two into .venv/optional/): 1.16 patches a fused LM head into every trainer, 1.14 SFT's default
`loss_type="chunked_nll"` patches another, both reading `lm_head.weight` themselves; 1.6 trains on the model's
logits. Under each, `compact_trainer` SFT equals full training with the unused rows frozen."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter per TRL (~15 s each)

TESTS = Path(__file__).resolve().parent
OPTIONAL = Path(sys.prefix) / "optional"
# TRL version -> (the forward it installs, the adapter that replaces it, restricted mode's outcome)
VERSIONS = {
    "newest": ("method", "CompactFusedLMHead", "trains"),
    "1.14.2": ("method", "CompactChunkedNLL", "trains"),
    "1.6.0": ("NoneType", "NoneType", "refused"),  # no forward of its own: the model's logits
}


@pytest.mark.parametrize("version", VERSIONS)
def test_compact_trainer_is_exact_under_each_trl_behaviour(tmp_path, version):
    folder = [] if version == "newest" else [str(OPTIONAL / f"trl-{version}")]
    if folder and not Path(folder[0], "trl").is_dir():
        pytest.fail(f"{folder[0]} is missing: run scripts/setup.sh")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*folder, str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result_path = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(TESTS / "helpers" / "trl_job.py"), str(tmp_path), str(result_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    if version != "newest":
        assert result["version"] == version
    forward, adapter, restricted = VERSIONS[version]
    assert (result["forward"], result["adapted"]) == (forward, adapter)
    for got, want in zip(result["pema"], result["baseline"], strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert result["max_weight_difference"] < 1e-6
    if restricted == "refused":  # the logits path: metrics read logits (U columns; none in a fused step)
        assert "computes its metrics from the model's logits" in result["restricted"]
        assert "reads the model's logits for its metrics" in result["fused"]
    else:
        assert isinstance(result["restricted"], list) and len(result["restricted"]) == 2
        for got, want in zip(result["fused"], result["baseline"], strict=True):  # fused_loss=True: the same run
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
