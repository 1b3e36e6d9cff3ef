"""What :func:`pema_triton.scan_vocabulary` can read, as chunks of token ids: tensors, numpy arrays, lists, dict
batches, iterables of those (DataLoaders), `datasets.Dataset` / `DatasetDict` (through Arrow, without Python loops)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

import torch

from .errors import PemaDTypeError, PemaError

__all__ = ["is_datasets", "progress_total", "source_chunks", "widened_ids"]


def is_datasets(source, kind: str) -> bool:
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


def source_chunks(source, columns: tuple[str, ...], batch_size: int, seen: set[str]):
    """Yields (ids, done): int tensors of token ids from any supported source (see :func:`scan_vocabulary`), and
    how far each moves the progress bar, in the unit of :func:`progress_total` (dataset rows, else items).

    `ids` is None on the marker that closes one item of an iterable. `seen` collects the columns found.
    """
    if isinstance(source, (str, bytes)):
        raise PemaError(f"cannot scan text ({str(source)[:40]!r}): scan token ids, i.e. tokenize the data first")
    if _is_numpy_array(source):
        source = torch.from_numpy(source.astype("int64")) if source.dtype.kind == "u" else torch.as_tensor(source)
    if isinstance(source, torch.Tensor):
        yield widened_ids(source), 1
    elif is_datasets(source, "DatasetDict") or is_datasets(source, "IterableDatasetDict"):
        for split in source.values():
            yield from source_chunks(split, columns, batch_size, seen)
    elif is_datasets(source, "Dataset"):
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
            _refuse_tuple_batch(item)
            for ids, _ in source_chunks(item, columns, batch_size, seen):
                if ids is not None:
                    yield ids, 0
            yield None, 1
    else:
        raise PemaError(f"cannot scan a {type(source).__name__}: give tensors, dict batches, a DataLoader or a dataset")


def _refuse_tuple_batch(item) -> None:
    """A batch of several tensors (a DataLoader over TensorDataset(ids, labels)) says none of them is the ids: the
    class labels would be scanned as token ids."""
    if isinstance(item, (list, tuple)) and len(item) > 1 and all(isinstance(t, torch.Tensor) for t in item):
        raise PemaError(f"a batch of {len(item)} tensors (a TensorDataset's (input_ids, labels)?) does not say which "
                        "are token ids; scan the ids tensor itself, or batches that are dicts with an "
                        "'input_ids' key (columns= picks the keys)")


def progress_total(source) -> int | None:
    """Length of the progress bar: rows of a dataset (all splits of a DatasetDict), items of a sized iterable."""
    if is_datasets(source, "DatasetDict"):
        return sum(len(split) for split in source.values())
    if isinstance(source, torch.Tensor) or not hasattr(source, "__len__"):
        return None
    return len(source)


def widened_ids(ids: torch.Tensor) -> torch.Tensor:
    """Integer ids of a dtype the scan kernels do not take (uint8, int16, uint16 from numpy token files, ...) as
    int64; int32 / int64 as they are, anything else left for the scan to refuse."""
    integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
    return ids.to(torch.int64) if integer and ids.dtype not in (torch.int32, torch.int64) else ids


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
