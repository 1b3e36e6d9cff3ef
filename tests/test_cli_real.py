"""The installed `pema-triton` command (and `python -m pema_triton`) on real MiniLM and real BBC News text, as a user
runs it from a shell."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import real_assets

pytestmark = pytest.mark.slow  # fresh interpreters that import transformers


@pytest.mark.parametrize("command", [["pema-triton"], [sys.executable, "-m", "pema_triton"]],
                         ids=["console-script", "python-m"])
def test_scan_reports_the_used_share_and_the_estimate(tmp_path, command):
    texts, _ = real_assets.bbc_news(20)
    data = tmp_path / "bbc.txt"
    data.write_text("\n".join(text.replace("\n", " ") for text in texts))
    if command[0] == "pema-triton":
        command = [shutil.which("pema-triton") or str(Path(sys.executable).parent / "pema-triton")]
    result = subprocess.run([*command, "scan", str(real_assets.minilm_dir()), str(data), "--json", "--quiet",
                             "--tokens-per-step", "4096"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["vocab_size"] == 30522 and 1000 < report["num_used"] < 5000
    assert report["most_frequent"][0]["token"] == "the"
    full, frozen = report["estimate"]["full"], report["estimate"]["frozen"]  # an encoder: its input compacted
    assert set(report["estimate"]) == {"full", "frozen"} and frozen["optimizer"] < full["optimizer"]
    assert full["logits"] == 0  # no LM head: no logits over the vocabulary
