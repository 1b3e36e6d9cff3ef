"""Finding the vocabulary a dataset uses: a streaming scan into a [V] byte map, then used ids and the remap."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .distributed import in_distributed_job, largest_across_ranks, union_across_ranks
from .errors import PemaDTypeError, PemaError, PemaWarning
from .ops.dispatch import resolve_backend
from .ops.remap import Compaction, build_remap, validate_used_ids
from .ops.scan import scan_ids

__all__ = ["VocabularyScan", "scan_vocabulary", "special_token_ids", "used_ids_from_byte_map"]


def used_ids_from_byte_map(byte_map: torch.Tensor) -> torch.Tensor:
    """[V] byte map -> [U] sorted int64 ids whose entry is non-zero."""
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
        if vocab_size < 1:
            raise PemaError(f"vocab_size must be positive, got {vocab_size}")
        self.device = torch.device(device)
        resolve_backend(backend, self.device)  # an impossible backend fails here, not at the first chunk
        self.vocab_size, self.ignore_index, self.backend = vocab_size, ignore_index, backend
        self.byte_map = torch.zeros(vocab_size, dtype=torch.uint8, device=self.device)
        self.counts = torch.zeros(vocab_size, dtype=torch.int64, device=self.device) if count else None
        self.num_tokens = 0

    def update(self, ids: torch.Tensor) -> VocabularyScan:
        """Marks every id of `ids` [*] (int32/int64). Raises IdOutOfRangeError on ids outside [0, V)."""
        ids = torch.as_tensor(ids).to(self.device, non_blocking=True)
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
        keep = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.int64)
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
        warnings.warn(
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


def _is_datasets(source, kind: str) -> bool:
    """isinstance against a `datasets` class without importing datasets (an optional dependency)."""
    return any(cls.__module__.startswith("datasets") and cls.__name__ == kind for cls in type(source).__mro__)


def _arrow_ids(column, name: str) -> torch.Tensor:
    """Flattens a pyarrow (chunked) list column of token ids, however nested, into one int64 tensor."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        while pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            chunk = chunk.flatten()
        if not pa.types.is_integer(chunk.type) and not pa.types.is_null(chunk.type):
            raise PemaDTypeError(f"column {name!r} holds {chunk.type}, not integer token ids; tokenize it first, "
                                 f"or cast it if it holds ids stored as floats")
        parts.append(torch.from_numpy(chunk.to_numpy(zero_copy_only=False).astype("int64")))  # a writable copy
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _chunks(source, columns: tuple[str, ...], batch_size: int, seen: set[str]):
    """Yields (ids, done): int tensors of token ids from any supported source (see :func:`scan_vocabulary`), and
    how far each moves the progress bar, in the unit of :func:`_progress_total` (dataset rows, else items).

    `ids` is None on the marker that closes one item of an iterable. `seen` collects the columns found.
    """
    if isinstance(source, (str, bytes)):
        raise PemaError(f"cannot scan text ({str(source)[:40]!r}): scan token ids, i.e. tokenize the data first")
    if _is_numpy_array(source):
        source = torch.as_tensor(source)
    if isinstance(source, torch.Tensor):
        yield source, 1
    elif _is_datasets(source, "DatasetDict") or _is_datasets(source, "IterableDatasetDict"):
        for split in source.values():
            yield from _chunks(split, columns, batch_size, seen)
    elif _is_datasets(source, "Dataset"):
        present = [c for c in columns if c in source.column_names]
        if not present:
            raise PemaError(f"dataset has none of the columns {columns}; its columns are {source.column_names}")
        seen.update(present)
        # Arrow batches respect shuffles and selections (indices mappings) and flatten without Python loops.
        for table in source.with_format("arrow").iter(batch_size=batch_size):
            for k, name in enumerate(present):
                yield _arrow_ids(table[name], name), table.num_rows if k == len(present) - 1 else 0
    elif isinstance(source, Mapping):
        present = [c for c in columns if c in source]
        if not present:
            raise PemaError(f"batch has none of the columns {columns}; its keys are {list(source)}")
        seen.update(present)
        for k, name in enumerate(present):
            yield _as_ids(source[name], name), 1 if k == len(present) - 1 else 0
    elif isinstance(source, (list, tuple)) and source and isinstance(source[0], numbers.Integral):
        yield _as_ids(source, "ids"), 1
    elif isinstance(source, Iterable):
        for item in source:
            for ids, _ in _chunks(item, columns, batch_size, seen):
                if ids is not None:
                    yield ids, 0
            yield None, 1
    else:
        raise PemaError(f"cannot scan a {type(source).__name__}: give tensors, dict batches, a DataLoader or a dataset")


def _progress_total(source) -> int | None:
    """Length of the progress bar: rows of a dataset (all splits of a DatasetDict), items of a sized iterable."""
    if _is_datasets(source, "DatasetDict"):
        return sum(len(split) for split in source.values())
    if isinstance(source, torch.Tensor) or not hasattr(source, "__len__"):
        return None
    return len(source)


def _is_numpy_array(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _as_ids(value, name: str) -> torch.Tensor:
    """A column's value (a tensor, numpy array, list of ids or ragged list of rows) as a flat tensor of ids;
    float ids stay float, so the scan refuses them rather than truncating."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):  # ragged lists
        value = [i for row in value for i in row]
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise PemaError(f"column {name!r} does not hold token ids ({err}); tokenize the data first") from None
    return ids if ids.numel() else ids.to(torch.int64)  # an empty row has no dtype of its own


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
    keep = [int(i) for i in keep]
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
    for ids, done in _chunks(source, columns, batch_size, seen):
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


def _progress(source, progress: bool | None):
    if progress is False:
        return None
    total = _progress_total(source)
    if progress is None and (total is None or total < 100):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    unit = "row" if _is_datasets(source, "Dataset") or _is_datasets(source, "DatasetDict") else "batch"
    return tqdm(total=total, desc="scanning vocabulary", unit=unit)
