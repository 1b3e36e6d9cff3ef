"""Finding the vocabulary a dataset uses: a streaming scan into a [V] byte map, then used ids and the remap."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._checks import check_used_ids
from .errors import PemaError
from .ops import scan_ids, use_triton
from .reference import build_remap, used_ids_from_bitmap

__all__ = ["VocabularyScan"]


class VocabularyScan:
    """Accumulates the set of token ids seen across chunks of a dataset (and optionally their counts).

    Each :meth:`update` marks a chunk's ids in a [V] uint8 map on `device` (the Triton scan on GPU); chunks may
    have any shape and arrive in any number, so a dataset of any size streams through in constant memory.

    Args:
        vocab_size: V, the model's vocabulary size (`len(tokenizer)` or `config.vocab_size`, whichever is larger).
        device: where the map lives; chunks are moved there.
        count: also keep [V] int64 occurrence counts.
        ignore_index: an id skipped silently (-100, the ignored label), or None.
        backend: "auto", "triton" or "torch".

    Examples:
        >>> scan = VocabularyScan(vocab_size=30_522)
        >>> for batch in [torch.tensor([[101, 2023, 102]]), torch.tensor([101, 7592, 102])]:
        ...     _ = scan.update(batch)
        >>> scan.used_ids()
        tensor([ 101,  102, 2023, 7592])
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        device: torch.device | str = "cpu",
        count: bool = False,
        ignore_index: int | None = -100,
        backend: str = "auto",
    ):
        if vocab_size < 1:
            raise PemaError(f"vocab_size must be positive, got {vocab_size}")
        self.device = torch.device(device)
        use_triton(backend, self.device)  # an impossible backend fails here, not at the first chunk
        self.vocab_size, self.ignore_index, self.backend = vocab_size, ignore_index, backend
        self.bitmap = torch.zeros(vocab_size, dtype=torch.uint8, device=self.device)
        self.counts = torch.zeros(vocab_size, dtype=torch.int64, device=self.device) if count else None
        self.num_tokens = 0

    def update(self, ids: torch.Tensor) -> VocabularyScan:
        """Marks every id of `ids` [*] (int32/int64). Raises IdOutOfRangeError on ids outside [0, V)."""
        ids = torch.as_tensor(ids).to(self.device, non_blocking=True)
        scan_ids(ids, self.bitmap, self.counts, ignore_index=self.ignore_index, backend=self.backend)
        self.num_tokens += ids.numel()
        return self

    def update_all(self, chunks: Iterable[torch.Tensor]) -> VocabularyScan:
        for ids in chunks:
            self.update(ids)
        return self

    @property
    def num_used(self) -> int:
        return int(self.bitmap.count_nonzero())

    def used_ids(self, keep: Iterable[int] | torch.Tensor = ()) -> torch.Tensor:
        """[U] sorted int64 ids seen so far, plus `keep` (ids that must stay, e.g. special tokens)."""
        bitmap = self.bitmap
        keep = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.int64)
        if keep.numel():
            bitmap = bitmap.clone()
            bitmap[check_used_ids(torch.unique(keep), self.vocab_size, self.device)] = 1
        return used_ids_from_bitmap(bitmap)

    def remap(self, keep: Iterable[int] | torch.Tensor = ()) -> torch.Tensor:
        """[V] int32 table: compact row of each used id, -1 elsewhere."""
        return build_remap(self.used_ids(keep), self.vocab_size)

    def __repr__(self) -> str:
        return f"VocabularyScan(vocab_size={self.vocab_size}, num_used={self.num_used}, num_tokens={self.num_tokens})"
