"""One rank of a 2-rank gloo FSDP2 job for tests/test_distributed.py, launched by `torchrun --standalone`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/fsdp_job.py NAME OUTPUT RESULT_DIR

Each rank scans its own shard, compacts, shards the layers and the root with `fully_shard`, and trains
ddp_job.STEPS steps, writing a sharded `torch.distributed.checkpoint` (model and optimizer) after CUT of them.
Then: the full-vocabulary state dict (rank 0 saves it with save_pretrained), a refused restore_embeddings (and the
state dict after it; tried after a forward without backward, which leaves the root's compact rows unsharded), a
fresh model resumed from the sharded checkpoint that trains the remaining steps, and one compacted with other used
ids (as many) that resumes from it, whose optimizer step must refuse the checkpoint's optimizer state. Rank 0 writes
RESULT_DIR/result.pt; RESULT_DIR/pretrained is the plain checkpoint, RESULT_DIR/dcp the sharded one.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

from helpers import ddp_job, tiny_models  # tests/ is on PYTHONPATH (set by the test that launches this job)
from pema_triton import (
    Compaction,
    PemaError,
    ShardedModelError,
    get_handle,
    replace_embeddings,
    restore_embeddings,
    scan_vocabulary,
)

CUT = 1  # optimizer steps before the sharded checkpoint
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def sharded_model(name, output, used):
    model = tiny_models.build(name)  # the same seed: the same initial weights on every rank
    replace_embeddings(model, used, output=output)
    for layer in model.model.layers if hasattr(model, "model") else model.transformer.h:
        fully_shard(layer)
    fully_shard(model)
    return model


def holdings(model):
    """What this rank holds of the compacted modules: each tensor's local shape."""
    local = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight", "frozen_weight", "remap")):
            local[name] = tuple(getattr(tensor, "_local_tensor", tensor).shape)
    return local


def resume(name, output, compaction, steps, checkpoint):
    """A fresh sharded model compacted with `compaction`, resumed from the sharded checkpoint, trained on."""
    model = sharded_model(name, output, compaction)
    optimizer = ddp_job.adamw(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    ddp_job.train(model, steps, optimizer=optimizer)
    return get_model_state_dict(model, options=FULL)


def other_compaction(used, steps):
    """As many used ids as `used`, one of them another id; `steps` with that id replaced by a kept one."""
    gone, kept = int(used[-1]), int(used[0])
    other = sorted(set(used.tolist()) - {gone} | {min(set(range(tiny_models.V)) - set(used.tolist()))})
    return torch.tensor(other), [torch.where(step == gone, kept, step) for step in steps]


def main(rank, name, output, result_dir):
    result_dir, checkpoint = Path(result_dir), Path(result_dir) / "dcp"
    output = None if output == "None" else output
    model = tiny_models.build(name)
    used, _ = tiny_models.used_ids_and_batch(model)
    mine = ddp_job.batches(used, rank)
    used = scan_vocabulary(mine, tiny_models.V, keep=sorted(tiny_models.special_ids(model)))

    model = sharded_model(name, output, used)
    optimizer = ddp_job.adamw(model)
    ddp_job.train(model, mine[:CUT], optimizer=optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    if rank == 0:  # DCP writes no pema_compaction.json: the used ids its optimizer state belongs to
        get_handle(model).compaction.save(checkpoint)
    ddp_job.train(model, mine[CUT:], optimizer=optimizer)
    full = get_model_state_dict(model, options=FULL)  # on rank 0 only (cpu_offload); every rank must call it
    if rank == 0:
        model.save_pretrained(result_dir / "pretrained", state_dict=dict(full))  # it empties the dict it writes
    result = {"used": used, "full": full, "holdings": holdings(model)}
    with torch.no_grad():  # a forward without backward leaves the root's parameters (the compact rows) unsharded
        model(input_ids=mine[0])
    try:
        restore_embeddings(model)
        result["restore_error"] = "no error"
    except ShardedModelError as err:
        result["restore_error"] = str(err)
    result["after_restore"] = get_model_state_dict(model, options=FULL)

    dist.barrier()  # the compaction file is written
    result["resumed"] = resume(name, output, Compaction.load(checkpoint), mine[CUT:], checkpoint)
    try:
        resume(name, output, *other_compaction(used, mine[CUT:]), checkpoint)
        result["other_compaction_error"] = "no error"
    except PemaError as err:
        result["other_compaction_error"] = str(err)
    if rank == 0:
        torch.save(result, result_dir / "result.pt")


if __name__ == "__main__":
    ddp_job.run_rank(main, *sys.argv[1:4])
