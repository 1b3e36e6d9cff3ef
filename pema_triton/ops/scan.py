"""The vocabulary scan's one chunk: mark (and count) the ids of a tensor in a [V] byte map."""

from __future__ import annotations

import torch

from .dispatch import implementation
from .remap import raise_for_out_of_range

__all__ = ["scan_ids"]


def scan_ids(
    ids: torch.Tensor,
    byte_map: torch.Tensor,
    counts: torch.Tensor | None = None,
    *,
    ignore_index: int | None = None,
    backend: str = "auto",
) -> None:
    """Marks each id of `ids` in `byte_map` (and counts it); call once per chunk to stream a dataset.

    Args:
        ids: [*] token ids, int32 or int64, on byte_map's device.
        byte_map: [V] uint8, set to 1 at every id seen (in place).
        counts: [V] int64 occurrences, incremented in place, or None.
        ignore_index: an id to skip (-100 for ignored labels), or None.
        backend: "auto", "triton" or "torch".

    Raises:
        IdOutOfRangeError: an id (other than `ignore_index`) outside [0, V); nothing of that chunk is lost
            for the valid ids, which are marked.
    """
    impl = implementation(backend, byte_map.device)
    if impl.scan_ids(ids, byte_map, counts, ignore_index).item():
        raise_for_out_of_range(
            ids, byte_map.numel(), ignore_index=ignore_index,
            hint="pass the tokenizer's full size (len(tokenizer)) as vocab_size",
        )

