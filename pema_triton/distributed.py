"""Compaction in a `torch.distributed` job: one vocabulary for every rank, and nothing [V, D] on the wire.

- The scan combines the ranks' byte maps (one all-reduce of V bytes), so ranks that each scan their own shard
  compact to the same used ids.
- `replace_embeddings` checks that every rank passed the same used ids (an all-reduce of three integers) and
  raises `UsedIdsError` naming the ranks that differ, where DDP would fail on a shape in its constructor.
- DDP leaves the buffers of a compacted model alone: a `frozen` head's [V, D] matrix is identical on every rank
  and never changes, so broadcasting it every forward (`broadcast_buffers=True`, DDP's default) only costs time.
- FSDP2 (`fully_shard`) shards the compact [U, D] rows like any Parameter, ceil(U / ranks) rows per rank; the
  buffers (the remap table, a `frozen` head's [V, D] matrix) stay whole on every rank. A state dict still holds
  each compacted matrix as the full [V, D] tensor under its original name, the same plain tensor on every rank:
  its compact rows are all-gathered (U x D, where FSDP gathers them every forward anyway) into the kept original,
  which sits whole on every rank already. So `state_dict()` of a sharded compacted model is a collective that
  every rank must call, as `torch.distributed.checkpoint` does; a sharded (DCP) checkpoint writes each such
  tensor once, as a replicated one, and loads the same checkpoint format as one process writes. Restoring while
  sharded is refused: FSDP would keep putting the compact rows back into the restored modules.
- Only the main process (rank 0) logs, warns and shows the scan's progress bar (:func:`is_main_process`).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from .errors import ShardedModelError, UsedIdsError

__all__ = [
    "check_same_used_ids", "in_distributed_job", "is_main_process", "keep_buffers_out_of_ddp", "largest_across_ranks",
    "main_process_logger", "placed_like", "refuse_sharded_restore", "union_across_ranks", "warn_on_main_process",
    "whole",
]

_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # DDP reads this attribute of the module it wraps


def is_main_process() -> bool:
    """Rank 0 of the initialized process group; before one exists, the rank torchrun and `accelerate launch` put
    in the environment (RANK); True outside a job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


def main_process_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)`, its records dropped outside the main process (a logger's filters do not reach
    its children, so each module's logger gets one)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _MainProcessOnly) for f in logger.filters):
        logger.addFilter(_MainProcessOnly())
    return logger


def warn_on_main_process(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """`warnings.warn` in the main process only: N ranks would print the same advice N times."""
    if is_main_process():
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def in_distributed_job(group=None) -> bool:
    """Whether a process group is initialized with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def largest_across_ranks(value: int, group=None) -> int:
    """The largest of every rank's `value` (the vocabulary size of scans that grew to their largest id)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor)


def union_across_ranks(byte_map: torch.Tensor, counts: torch.Tensor | None, group=None) -> None:
    """Every rank's byte map becomes the union of all ranks' (and counts their sum), in place."""
    import torch.distributed as dist

    device = _collective_device(group)
    for tensor, op in ((byte_map, dist.ReduceOp.MAX), (counts, dist.ReduceOp.SUM)):
        if tensor is None:
            continue
        moved = tensor.to(device)
        dist.all_reduce(moved, op=op, group=group)
        tensor.copy_(moved)


def check_same_used_ids(fingerprint: tuple[int, int, int], group=None) -> None:
    """Raises `UsedIdsError` on every rank unless all ranks compact with the same (V, U, checksum)."""
    import torch.distributed as dist

    mine = torch.tensor(fingerprint, dtype=torch.int64, device=_collective_device(group))
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if torch.equal(low, high):
        return
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, tuple(fingerprint), group=group)
    groups: dict[tuple, list[int]] = {}
    for rank, value in enumerate(everyone):
        groups.setdefault(tuple(value), []).append(rank)
    described = "; ".join(f"ranks {ranks}: U={value[1]:,} of V={value[0]:,} (checksum {value[2]:08x})"
                          for value, ranks in groups.items())
    raise UsedIdsError(
        f"the ranks passed different used ids ({described}); every rank must compact to the same vocabulary. "
        f"scan_vocabulary combines the ranks' scans by default inside a distributed job: scan on every rank (or "
        f"scan once and broadcast the ids) before replace_embeddings"
    )


def keep_buffers_out_of_ddp(handle) -> None:
    """Names the compacted modules' buffers in the model's DDP ignore list (undone on restore)."""
    model = handle.model
    names = [f"{path}.{name}" for path, module in model.named_modules()
             if any(module is m for m in handle.embeddings + handle.heads)
             for name, buffer in module._buffers.items() if buffer is not None]
    previous = list(getattr(model, _DDP_IGNORE, []))
    handle.patch(model, _DDP_IGNORE, previous + [n for n in names if n not in previous])


def _is_dtensor(tensor) -> bool:
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole on every rank: a DTensor (FSDP2's sharded compact rows) all-gathered, so every rank must
    call this at the same point; any other tensor as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def placed_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor`, whole and the same on every rank, laid out as `param` is: for a DTensor, this rank's shard, cut
    out locally (no communication), so `load_state_dict` copies it into FSDP2's shard; else `tensor` itself."""
    if not _is_dtensor(param):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def refuse_sharded_restore(handle) -> None:
    """Raises before anything changes if FSDP2 manages a compacted module's compact rows: the module or one of its
    ancestors is an `FSDPModule` (`fully_shard` manages every Parameter below it that no nested call claims). Not
    "is the weight a DTensor": after a forward without backward the root's rows stay unsharded, plain tensors."""
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    model = handle.model
    sharded = [path for path, module in model.named_modules() if isinstance(module, FSDPModule)]
    compacted = [path for path, module in model.named_modules()
                 if any(module is m for m in handle.embeddings + handle.heads)]
    managed = [c for c in compacted if any(s == "" or c == s or c.startswith(s + ".") for s in sharded)]
    if managed:
        raise ShardedModelError(
            f"restore_embeddings on a model sharded by FSDP ({managed[0]!r} is under fully_shard): FSDP holds the "
            f"compact rows and would put them back into the restored modules. Save the full-vocabulary state dict "
            f"instead, on every rank: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
            f"cpu_offload=True)), which a plain transformers model loads"
        )
