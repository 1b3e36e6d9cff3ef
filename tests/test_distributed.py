"""Compaction in a torch.distributed job: 2 CPU ranks over gloo (torchrun, loopback rendezvous).

Each rank scans its own shard (the scan combines them), compacts, trains under DDP or FSDP2, and the result must
be the model one process trains on the concatenation of the ranks' batches. Ranks that pass different used ids
get a UsedIdsError naming them, not DDP's shape error. FSDP2 checkpoints are full-vocabulary (plain and sharded)
and resume exactly. Each job runs in its own processes with a time limit.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ddp_job, fsdp_job, tiny_models
from pema_triton import replace_embeddings, restore_embeddings, scan_vocabulary

pytestmark = pytest.mark.slow  # torchrun jobs of 2 gloo ranks (~95 s): `make test-all`

transformers = pytest.importorskip("transformers")
CASES = [("llama-untied", "frozen"), ("llama-untied", "restricted"), ("llama-untied", None), ("gpt2", "frozen")]


def _torchrun(job, *args):
    tests = str(Path(job.__file__).parents[1])
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=path)  # an abort prints stacks
    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # set by the examples tests import: no bars
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(ddp_job.WORLD), job.__file__, *map(str, args)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _one_process(name, output):
    """The reference: one process, compacted with the union of the shards, trained on every rank's rows."""
    model = tiny_models.build(name)
    used, _ = tiny_models.used_ids_and_batch(model)
    batches = ddp_job.batches(used)
    everything = scan_vocabulary(batches, tiny_models.V, keep=sorted(tiny_models.special_ids(model)))
    replace_embeddings(model, everything, output=output)
    ddp_job.train(model, batches)
    restore_embeddings(model)
    return model, everything


def _assert_round_off(got: dict, model):
    # Round-off only (DDP and FSDP average the two ranks' mean losses' gradients; one process, the mean over both),
    # which Adam can amplify to ~2 lr per step where a gradient is near zero: every element within that, nearly
    # all within 1e-5.
    far, total = 0, 0
    for key, tensor in model.state_dict().items():
        diff = (got[key] - tensor).abs()
        assert float(diff.max()) <= 2 * 1e-2 * ddp_job.STEPS, key
        far, total = far + int((diff > 1e-5).sum()), total + diff.numel()
    assert far <= 1e-3 * total, f"{far} of {total} elements differ by more than 1e-5"


@pytest.mark.parametrize("name, output", CASES)
def test_ddp_trains_the_model_one_process_trains_on_all_batches(name, output, tmp_path):
    _torchrun(ddp_job, "train", name, output, tmp_path / "rank0.pt")
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)
    model, everything = _one_process(name, output)
    assert torch.equal(result["used"], everything)  # each rank's scan became the union of all shards

    # DDP broadcasts none of the compacted modules' buffers (a frozen head's is [V, D]) ...
    embedding = "transformer.wte" if name == "gpt2" else "model.embed_tokens"
    expected = {f"{embedding}.remap", f"{embedding}.used_ids"} | ({"lm_head.frozen_weight"} if output == "frozen"
                                                                   else set())
    assert expected <= result["ignored"]
    # ... and synchronises no [V, D] gradient: the compact rows (and an untouched head's full matrix).
    assert result["vocabulary_sized"] == ([] if output is not None else ["lm_head.weight"])
    _assert_round_off(result["state"], model)


@pytest.mark.parametrize("name, output", CASES)
def test_fsdp2_trains_like_one_process_and_checkpoints_full_vocabulary(name, output, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _torchrun(fsdp_job, name, output, tmp_path)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    model, everything = _one_process(name, output)
    assert torch.equal(result["used"], everything)
    _assert_round_off(result["full"], model)  # the full-vocabulary state dict of the sharded model

    # Each rank holds its shard of the compact rows (ceil(U / 2) on rank 0) and the buffers whole.
    embedding = "transformer.wte" if name == "gpt2" else "model.embed_tokens"
    shard = (math.ceil(everything.numel() / ddp_job.WORLD), 32)
    assert result["holdings"][f"{embedding}.weight"] == shard
    assert result["holdings"][f"{embedding}.remap"] == (tiny_models.V,)
    assert result["holdings"].get("lm_head.frozen_weight") == ((tiny_models.V, 32) if output == "frozen" else None)

    # save_pretrained of that state dict is a plain checkpoint: transformers loads it, V rows, nothing compact.
    plain = type(model).from_pretrained(tmp_path / "pretrained")
    assert plain.config.vocab_size == tiny_models.V
    for key, tensor in plain.state_dict().items():
        assert torch.equal(tensor, result["full"][key]), key

    # The sharded checkpoint holds the same names and full-vocabulary shapes as the plain model's state dict.
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "dcp.pt")
    saved = torch.load(tmp_path / "dcp.pt", weights_only=False)["model"]
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in model.state_dict().items()}

    # A fresh sharded model resumed from it trains to the very same weights as the uninterrupted run.
    for key, tensor in result["full"].items():
        assert torch.equal(result["resumed"][key], tensor), key
    # One compacted with other used ids (as many: the shapes match) refuses the checkpoint's optimizer state.
    assert "AdamW.step() with optimizer state of another compaction" in result["other_compaction_error"], \
        result["other_compaction_error"]
    # Restoring while sharded is refused (tried after an eval forward, which leaves the root's compact rows
    # unsharded plain tensors), saying what to do, and changes nothing.
    assert "save the full-vocabulary state dict" in result["restore_error"].lower(), result["restore_error"]
    assert "get_model_state_dict" in result["restore_error"]
    for key, tensor in result["full"].items():
        assert torch.equal(result["after_restore"][key], tensor), key


def test_ranks_with_different_used_ids_get_an_error_naming_them(tmp_path):
    _torchrun(ddp_job, "mismatch", tmp_path)
    for rank in range(ddp_job.WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "the ranks passed different used ids (ranks [0]:" in message and "ranks [1]:" in message, message


def test_only_rank_0_logs_warns_and_shows_the_scan_progress(tmp_path):
    """Two ranks run the same scan and compaction; the launcher's output holds one progress bar, one log line and
    one warning, all from rank 0."""
    result = _torchrun(ddp_job, "manners")
    printed = result.stdout + result.stderr
    # One bar: tqdm draws a bar's 0% line once, at its start. Its 100% line is drawn by the last update when 0.1 s
    # (mininterval) has passed since the previous draw and again by close(), so a slow last batch shows it twice.
    assert printed.count("scanning vocabulary:   0%") == 1 and "scanning vocabulary: 100%" in printed, printed
    assert printed.count("pema_triton.handle: compacted LlamaForCausalLM") == 1
    assert "rank0 pema_triton.handle: compacted" in printed and "rank1 pema_triton" not in printed
    assert printed.count("used_ids lack special tokens") == 1
