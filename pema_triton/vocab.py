"""Finding the vocabulary a dataset uses: a streaming scan into a [V] byte map, then used ids and the remap."""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .distributed import (
    in_distributed_job,
    is_main_process,
    largest_across_ranks,
    union_across_ranks,
    warn_on_main_process,
)
from .errors import PemaError, PemaWarning, UsedIdsError, VocabularySizeError
from .ops.dispatch import resolve_backend
from .ops.remap import Compaction, build_remap, validate_used_ids
from .ops.scan import scan_ids
from .scan_sources import is_datasets, progress_total, source_chunks, widened_ids

__all__ = ["VocabularyScan", "scan_vocabulary", "special_token_ids", "used_ids_from_byte_map"]


def used_ids_from_byte_map(byte_map: torch.Tensor) -> torch.Tensor:
    """[V] byte map -> [U] sorted int64 ids whose entry is non-zero."""
    if byte_map.device.type == "cpu" and byte_map.dtype == torch.uint8 and not torch.compiler.is_compiling():
        # numpy's flatnonzero over the map's bytes seen as bools: 0.11 ms at V = 250k against torch.nonzero's 0.34
        # (2 CPU threads), a sixth of a 1M-id scan; the ids are numpy's intp, int64 here.
        return torch.from_numpy(np.flatnonzero(byte_map.numpy().view(np.bool_))).long()
    return torch.nonzero(byte_map).flatten()


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
        _check_vocab_size(vocab_size)
        self.device = torch.device(device)
        resolve_backend(backend, self.device)  # an impossible backend fails here, not at the first chunk
        self.vocab_size, self.ignore_index, self.backend = vocab_size, ignore_index, backend
        self.byte_map = torch.zeros(vocab_size, dtype=torch.uint8, device=self.device)
        self.counts = torch.zeros(vocab_size, dtype=torch.int64, device=self.device) if count else None
        self.num_tokens = 0

    def update(self, ids: torch.Tensor) -> VocabularyScan:
        """Marks every id of `ids` [*] (any integer dtype). Raises IdOutOfRangeError on ids outside [0, V)."""
        ids = widened_ids(torch.as_tensor(ids)).to(self.device, non_blocking=True)
        scan_ids(ids, self.byte_map, self.counts, ignore_index=self.ignore_index, backend=self.backend)
        self.num_tokens += ids.numel()
        return self

    def grow(self, vocab_size: int) -> VocabularyScan:
        """Enlarges the map to `vocab_size` ids (no-op if already that large); for scans of unknown V."""
        if vocab_size > self.vocab_size:
            extra = vocab_size - self.vocab_size
            self.byte_map = torch.cat([self.byte_map, self.byte_map.new_zeros(extra)])
            if self.counts is not None:
                self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
            self.vocab_size = vocab_size
        return self

    def update_all(self, chunks: Iterable[torch.Tensor]) -> VocabularyScan:
        for ids in chunks:
            self.update(ids)
        return self

    @property
    def num_used(self) -> int:
        return int(self.byte_map.count_nonzero())

    def used_ids(self, keep: Iterable[int] | torch.Tensor = ()) -> torch.Tensor:
        """[U] sorted int64 ids seen so far, plus `keep` (ids that must stay, e.g. special tokens)."""
        byte_map = self.byte_map
        keep = _keep_ids(keep)
        if keep.numel():
            byte_map = byte_map.clone()
            byte_map[validate_used_ids(torch.unique(keep), self.vocab_size).to(self.device)] = 1
        return used_ids_from_byte_map(byte_map)

    def remap(self, keep: Iterable[int] | torch.Tensor = ()) -> torch.Tensor:
        """[V] int32 table: compact row of each used id, -1 elsewhere."""
        return build_remap(self.used_ids(keep), self.vocab_size)

    def __repr__(self) -> str:
        return f"VocabularyScan(vocab_size={self.vocab_size}, num_used={self.num_used}, num_tokens={self.num_tokens})"


_SPECIAL_TOKENS = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")


# Special ids a model or tokenizer names, which a batch may hold though the scanned data did not.
_SPECIAL_ID_NAMES = ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def warn_missing_special_ids(model: nn.Module, compaction: Compaction, tokenizer) -> None:
    """Warns about special token ids the model (config, generation config) or tokenizer names that `compaction`'s
    used ids lack: a batch holding one would raise UnusedIdError."""
    named = {}
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None), tokenizer):
        for name in _SPECIAL_ID_NAMES:
            value = getattr(source, name, None) if source is not None else None
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(i, int) and 0 <= i < compaction.vocab_size:
                    named.setdefault(name, i)
    used = set(compaction.used_ids.tolist())
    missing = {name: i for name, i in named.items() if i not in used}
    if missing:
        warn_on_main_process(
            f"used_ids lack special tokens {missing}; a batch holding one will raise UnusedIdError. Keep them with "
            f"scan_vocabulary(..., keep=special_token_ids(tokenizer)) unless your data never contains them",
            PemaWarning,
            stacklevel=3,
        )


def special_token_ids(tokenizer) -> list[int]:
    """Sorted ids of a tokenizer's special tokens: pad, unk, bos, eos, mask, cls, sep and the added specials.

    Pass them as `keep` so a compacted model can still pad, start, stop and mask whatever the data held.
    """
    ids = {getattr(tokenizer, f"{name}_token_id", None) for name in _SPECIAL_TOKENS}
    ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _check_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise VocabularySizeError(f"vocab_size must be a positive int (len(tokenizer) or config.vocab_size), got "
                                  f"{vocab_size!r} ({type(vocab_size).__name__})")


def _keep_ids(keep) -> torch.Tensor:
    """`keep=` (None, a tensor, or any iterable of ints) as an int64 tensor."""
    if keep is None:
        return torch.empty(0, dtype=torch.int64)
    if not isinstance(keep, torch.Tensor):
        try:
            keep = torch.as_tensor(list(keep))
        except (TypeError, ValueError, RuntimeError) as err:
            raise UsedIdsError(f"keep must be token ids (e.g. special_token_ids(tokenizer)), got {keep!r}: {err}") \
                from None
    if keep.numel() and (keep.is_floating_point() or keep.is_complex() or keep.dtype == torch.bool):
        raise UsedIdsError(f"keep must be integer token ids, got {keep.dtype}")
    return keep.to(torch.int64).flatten()


def scan_vocabulary(
    source,
    vocab_size: int | None = None,
    *,
    columns: Iterable[str] | str = ("input_ids",),
    keep: Iterable[int] = (),
    ignore_index: int | None = -100,
    device: torch.device | str | None = None,
    backend: str = "auto",
    batch_size: int = 10_000,
    progress: bool | None = None,
    combine_ranks: bool = True,
    process_group=None,
) -> torch.Tensor:
    """The sorted token ids a dataset uses, for :func:`pema_triton.replace_embeddings`.

    Args:
        source: a tensor of ids; an iterable of tensors or of dict batches (`BatchEncoding` included); a
            `torch.utils.data.DataLoader`; a `datasets.Dataset`, or a `DatasetDict` (every split is scanned:
            the model will see them all).
        vocab_size: V, e.g. `len(tokenizer)`; None grows the map to the largest id seen.
        columns: the batch / dataset columns holding ids; add "labels" where labels are token ids.
        keep: ids that must stay whatever the data holds, e.g. :func:`special_token_ids`.
        ignore_index: an id skipped everywhere (-100, the ignored label), or None.
        device: where to scan; default CUDA when available (the Triton scan), else CPU (vectorised PyTorch).
        backend: "auto", "triton" or "torch".
        batch_size: rows per Arrow batch for datasets.
        progress: show a tqdm bar (default: when the source has a length and tqdm is installed).
        combine_ranks: inside an initialized `torch.distributed` job, return the ids every rank's source uses
            (one all-reduce of the [V] byte map), so ranks scanning their own shards compact alike; False keeps
            this rank's. `process_group` picks the ranks (default: all).

    Returns:
        [U] sorted int64 ids.

    Examples:
        >>> used = scan_vocabulary(dataset_dict, len(tokenizer), columns=("input_ids", "labels"),
        ...                        keep=special_token_ids(tokenizer))
    """
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    keep = _keep_ids(keep).tolist()
    if vocab_size is not None:
        _check_vocab_size(vocab_size)
    size = vocab_size if vocab_size is not None else max(keep, default=-1) + 1
    scan = VocabularyScan(max(size, 1), device=device, ignore_index=ignore_index, backend=backend)
    _scan_chunks(scan, source, columns, batch_size, grow=vocab_size is None, bar=_progress(source, progress))
    if combine_ranks and in_distributed_job(process_group):
        scan.grow(largest_across_ranks(scan.vocab_size, process_group))
        union_across_ranks(scan.byte_map, scan.counts, process_group)
    return scan.used_ids(keep=keep).cpu()


def _scan_chunks(scan: VocabularyScan, source, columns: tuple[str, ...], batch_size: int, grow: bool, bar) -> None:
    """Marks every chunk of `source` in `scan` (growing it to the largest id when `grow`), moving `bar`."""
    seen: set[str] = set()
    for ids, done in source_chunks(source, columns, batch_size, seen):
        if ids is not None:
            ids = torch.as_tensor(ids)
            if grow and ids.numel():
                scan.grow(int(ids.max()) + 1)
            scan.update(ids)
        if bar is not None and done:
            bar.update(done)
    if bar is not None:
        bar.close()
    if seen and seen != set(columns):  # a column no batch or split holds: most likely a typo
        raise PemaError(f"no batch or split has the column(s) {sorted(set(columns) - seen)}; scanned {sorted(seen)}")


def _datasets_bars_off() -> bool:
    """Whether the user turned `datasets`' progress bars off (read without importing datasets)."""
    datasets = sys.modules.get("datasets")
    enabled = getattr(datasets, "is_progress_bar_enabled", None)
    if enabled is not None:
        return not enabled()
    return os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE")


def _progress(source, progress: bool | None):
    """A tqdm bar, or None. By default only for a source of a known length of 100 or more, in the main process,
    and not where `datasets` progress bars are turned off (`datasets.disable_progress_bars()` or
    HF_DATASETS_DISABLE_PROGRESS_BARS); tqdm's own TQDM_DISABLE holds in any case."""
    if progress is False:
        return None
    total = progress_total(source)
    if progress is None and (total is None or total < 100 or not is_main_process() or _datasets_bars_off()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    unit = "row" if is_datasets(source, "Dataset") or is_datasets(source, "DatasetDict") else "batch"
    return tqdm(total=total, desc="scanning vocabulary", unit=unit)
