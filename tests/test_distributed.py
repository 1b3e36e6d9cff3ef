"""Compaction in a torch.distributed job: 2 CPU ranks over gloo (torchrun, loopback rendezvous).

Each rank scans its own shard (the scan combines them), compacts, trains under DDP and restores; the result must
be the model one process trains on the concatenation of the ranks' batches. Ranks that pass different used ids
get a UsedIdsError naming them, not DDP's shape error. Each job runs in its own processes with a time limit.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ddp_job, tiny_models

from pema_triton import replace_embeddings, restore_embeddings, scan_vocabulary

transformers = pytest.importorskip("transformers")
JOB = Path(ddp_job.__file__)


def _torchrun(*args):
    tests = str(JOB.parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(ddp_job.WORLD), str(JOB), *map(str, args)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("name, output", [("llama-untied", "frozen"), ("llama-untied", "restricted"),
                                          ("llama-untied", None), ("gpt2", "frozen")])
def test_ddp_trains_the_model_one_process_trains_on_all_batches(name, output, tmp_path):
    _torchrun("train", name, output, tmp_path / "rank0.pt")
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)

    model = tiny_models.build(name)
    used, _ = tiny_models.used_ids_and_batch(model)
    batches = ddp_job.batches(used)
    everything = scan_vocabulary(batches, tiny_models.V, keep=sorted(tiny_models.special_ids(model)))
    assert torch.equal(result["used"], everything)  # each rank's scan became the union of all shards
    replace_embeddings(model, everything, output=output)
    ddp_job.train(model, batches)
    restore_embeddings(model)

    # DDP broadcasts none of the compacted modules' buffers (a frozen head's is [V, D]) ...
    embedding = "transformer.wte" if name == "gpt2" else "model.embed_tokens"
    expected = {f"{embedding}.remap", f"{embedding}.used_ids"} | ({"lm_head.frozen_weight"} if output == "frozen"
                                                                   else set())
    assert expected <= result["ignored"]
    # ... and synchronises no [V, D] gradient: the compact rows (and an untouched head's full matrix).
    assert result["vocabulary_sized"] == ([] if output is not None else ["lm_head.weight"])
    # Round-off only (DDP averages the two ranks' mean losses' gradients; one process, the mean over both), which
    # Adam can amplify to ~2 lr per step where a gradient is near zero: every element within that, nearly all
    # within 1e-5.
    far, total = 0, 0
    for key, tensor in model.state_dict().items():
        diff = (result["state"][key] - tensor).abs()
        assert float(diff.max()) <= 2 * 1e-2 * ddp_job.STEPS, key
        far, total = far + int((diff > 1e-5).sum()), total + diff.numel()
    assert far <= 1e-3 * total, f"{far} of {total} elements differ by more than 1e-5"


def test_ranks_with_different_used_ids_get_an_error_naming_them(tmp_path):
    _torchrun("mismatch", tmp_path)
    for rank in range(ddp_job.WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "the ranks passed different used ids (ranks [0]:" in message and "ranks [1]:" in message, message
