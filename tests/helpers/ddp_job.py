"""One rank of a 2-rank gloo job for tests/test_distributed.py, launched by `torchrun --standalone`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_job.py train NAME OUTPUT RESULT
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_job.py mismatch RESULT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_job.py manners

`train`: each rank scans its own shard, compacts, trains under DDP and restores; rank 0 saves what the test
compares. `mismatch`: each rank scans only its shard (combine_ranks=False) and records replace_embeddings' error.
`manners`: each rank scans 120 batches (a progress bar by default), compacts without the special ids (a warning)
with pema_triton's INFO log on: the test counts what the job printed.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import tiny_models  # tests/ is on PYTHONPATH (set by the test that launches this job)
from pema_triton import UsedIdsError, replace_embeddings, restore_embeddings, scan_vocabulary

WORLD, STEPS, ROWS = 2, 3, 4  # ranks, optimizer steps, rows per rank and step


def batches(used, rank=None):
    """Per step, this rank's rows (or, with rank=None, every rank's rows concatenated)."""
    data = tiny_models.token_dataset(used, WORLD * STEPS * ROWS)["input_ids"]
    steps = [torch.tensor(data[s * WORLD * ROWS:(s + 1) * WORLD * ROWS]) for s in range(STEPS)]
    return steps if rank is None else [step[rank * ROWS:(rank + 1) * ROWS] for step in steps]


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)


def train(model, steps, step_fn=None, optimizer=None):
    optimizer = optimizer or adamw(model)
    for batch in steps:
        (step_fn or model)(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _train_job(rank, name, output, result_file):
    model = tiny_models.build(name)  # the same seed: the same initial weights on every rank
    used, _ = tiny_models.used_ids_and_batch(model)
    mine = batches(used, rank)
    shard_used = scan_vocabulary(mine, tiny_models.V, keep=sorted(tiny_models.special_ids(model)))
    replace_embeddings(model, shard_used, output=None if output == "None" else output)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ignored = set(ddp.parameters_to_ignore)
    vocabulary_sized = [n for n, p in ddp.module.named_parameters() if p.shape[0] == tiny_models.V]
    train(model, mine, step_fn=ddp)
    restore_embeddings(model)
    if rank == 0:
        torch.save({"state": model.state_dict(), "used": shard_used, "ignored": ignored,
                    "vocabulary_sized": vocabulary_sized}, result_file)


def _mismatch_job(rank, result_dir):
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    shard_used = scan_vocabulary(batches(used, rank), tiny_models.V, combine_ranks=False,
                                 keep=sorted(tiny_models.special_ids(model)))
    try:
        replace_embeddings(model, shard_used)
        message = "no error"
    except UsedIdsError as err:
        message = str(err)
    (Path(result_dir) / f"rank{rank}.txt").write_text(message)


def _manners_job(rank):
    import logging

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(name)s: %(message)s")
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    plain = used[~torch.isin(used, torch.tensor(sorted(tiny_models.special_ids(model))))]
    mine = [plain[torch.randint(0, len(plain), (6,))] for _ in range(120)]
    shard_used = scan_vocabulary(mine, tiny_models.V)  # no keep=: the special ids the config names are missing
    replace_embeddings(model, shard_used)


def run_rank(job, *args):
    """Run `job(rank, *args)` in a 2-minute gloo process group, then leave without interpreter finalization.

    The barrier keeps a rank from tearing down while its peer is still in a collective (gloo aborted 1 run in 4
    without it). Even after it, a gloo worker thread can still hold the last reference to a finished collective's
    tensors; released during finalization, that takes the GIL from a C++ thread and aborts the rank with
    "terminate called without an active exception" (pytorch/pytorch#179291 describes the mechanism). It did so once
    in CI's slow tier at 013dfd8, without a Python traceback (the launching tests set PYTHONFAULTHANDLER now: an
    abort prints each thread's Python stack). os._exit(0) skips finalization; a job that raised still exits 1 with
    its traceback.
    """
    dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    try:
        job(dist.get_rank(), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    JOBS = {"train": _train_job, "manners": _manners_job, "mismatch": _mismatch_job}
    run_rank(JOBS[sys.argv[1]], *sys.argv[2:])
