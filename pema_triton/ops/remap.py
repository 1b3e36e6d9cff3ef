"""The remap table and everything that maps original ids through it: the one home of "id -> compact row".

A compaction keeps the U used ids of a V-id vocabulary. The [V] int32 remap table holds the compact row of each
used id (its position in the sorted used ids) and -1 for every other id. The Triton kernels apply the same rule in
their shared prologue (`kernels/_common.py: load_compact_rows`); every PyTorch path goes through here.

Notation: V the original vocabulary size, U the number of used ids, N the number of ids in a batch.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import (
    IdOutOfRangeError,
    PemaDTypeError,
    PemaError,
    UnusedIdError,
    UsedIdsError,
    VocabularySizeError,
    format_ids,
)

COMPACTION_FILE = "pema_compaction.json"

__all__ = [
    "COMPACTION_FILE",
    "Compaction",
    "build_remap",
    "check_remap",
    "check_remap_fits",
    "compact_rows",
    "labels_to_columns",
    "raise_for_bad_ids",
    "raise_for_out_of_range",
    "validate_used_ids",
]


def build_remap(used_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[U] sorted used ids -> [V] int32 table on their device: `remap[used_ids[i]] = i`, -1 elsewhere.

    Raises:
        UsedIdsError: `used_ids` not sorted unique ids in [0, `vocab_size`) (checked on the host: set-up time).
    """
    device = used_ids.device if isinstance(used_ids, torch.Tensor) else torch.device("cpu")
    if device.type == "meta":  # a model built on the meta device: no values to check or to write
        return torch.empty(vocab_size, dtype=torch.int32, device=device)
    used_ids = validate_used_ids(used_ids, vocab_size).to(device)
    remap = torch.full((vocab_size,), -1, dtype=torch.int32, device=device)
    remap[used_ids] = torch.arange(used_ids.numel(), dtype=torch.int32, device=device)
    return remap


# Tables check_remap_fits has read already, unchanged since (weak reference, version, rows): the last few.
_FITTING: list[tuple[weakref.ref, int, int]] = []


def check_remap_fits(remap: torch.Tensor, num_rows: int) -> None:
    """Raises unless every entry of `remap` is -1 or a row of a `num_rows`-row matrix: a table that points past the
    matrix would make a kernel read or write outside it. Reads the table's extremes back (one sync on a GPU) once
    per table and version: a table used again, unchanged, costs nothing."""
    if torch.compiler.is_compiling():
        return
    for ref, version, rows in _FITTING:
        if ref() is remap and version == remap._version and rows == num_rows:
            return
    if remap.numel():
        low, high = (int(v) for v in torch.aminmax(remap))
        if low < -1 or high >= num_rows:
            raise PemaError(f"remap holds rows in [{low}, {high}] but the compact matrix has {num_rows} rows: every "
                            f"entry must be -1 (unused) or a row in [0, {num_rows}); build it with "
                            f"build_remap(used_ids, vocab_size) for a [{num_rows}, D] matrix of those ids' rows")
    _FITTING.append((weakref.ref(remap), remap._version, num_rows))
    del _FITTING[:-8]


def check_remap(remap: torch.Tensor, device: torch.device) -> None:
    """Raises unless `remap` is a 1-D int32 table on `device` (where the ids it maps live)."""
    if remap.dtype != torch.int32 or remap.dim() != 1:
        raise PemaDTypeError(
            f"remap must be a 1-D int32 table of length V, got {remap.dtype} of shape {tuple(remap.shape)}"
        )
    if remap.device != device:
        raise PemaError(f"remap is on {remap.device} but the ids are on {device}; move both to one device")


def validate_used_ids(used_ids, vocab_size: int) -> torch.Tensor:
    """`used_ids` (a tensor or a sequence of ints) as a [U] int64 CPU tensor of sorted unique ids in [0, V).

    Validated on the host: these checks read values back, which on a GPU tensor would be a sync each.

    Raises:
        UsedIdsError: not integers, not 1-D, empty, unsorted, duplicated or outside [0, `vocab_size`).
    """
    ids = _as_id_tensor(used_ids)
    if ids.dim() != 1 or ids.numel() == 0:
        raise UsedIdsError(f"used_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    ids = ids.detach().to("cpu", torch.int64)
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        raise UsedIdsError(f"used_ids {format_ids(outside.tolist())} are outside the vocabulary [0, {vocab_size})")
    steps = ids[1:] - ids[:-1]
    if bool((steps == 0).any()):
        dup = torch.unique(ids[1:][steps == 0]).tolist()
        raise UsedIdsError(f"used_ids must be unique; {format_ids(dup)} appear more than once (use torch.unique)")
    if bool((steps < 0).any()):
        raise UsedIdsError("used_ids must be sorted ascending (torch.unique returns them sorted)")
    return ids


def _as_id_tensor(used_ids) -> torch.Tensor:
    if isinstance(used_ids, (set, frozenset)):
        used_ids = sorted(used_ids)  # a set has no order to check: its sorted ids are what it means
    elif isinstance(used_ids, Iterable) and not isinstance(used_ids, (torch.Tensor, Sequence)) \
            and not hasattr(used_ids, "__array__"):
        used_ids = list(used_ids)  # a generator or dict keys: torch.as_tensor takes sequences and arrays only
    try:
        ids = torch.as_tensor(used_ids)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UsedIdsError(f"used_ids must be integer token ids, got {type(used_ids).__name__}: {err}") from None
    if ids.numel() == 0:  # torch.as_tensor([]) is float32: say what is wrong, not the dtype it guessed
        raise UsedIdsError("used_ids is empty: a compaction needs a non-empty set of ids (scan the data the model "
                           "will see)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UsedIdsError(f"used_ids must be integer token ids, got {ids.dtype}")
    return ids


@dataclass(frozen=True, eq=False)
class Compaction:
    """Validated used ids of one vocabulary: what every compacted module of a model is built from.

    Built once (:meth:`of`) and passed down, so a model whose matrix sits in several modules validates once.

    Attributes:
        used_ids: [U] int64 sorted unique ids in [0, V), on the CPU.
        vocab_size: V.
    """

    used_ids: torch.Tensor
    vocab_size: int

    @classmethod
    def of(cls, used_ids, vocab_size: int) -> Compaction:
        """`used_ids` validated against `vocab_size`; a Compaction of that V is returned as it is."""
        if isinstance(used_ids, Compaction):
            if used_ids.vocab_size != vocab_size:
                raise UsedIdsError(
                    f"used ids were compacted for V={used_ids.vocab_size}, this matrix has V={vocab_size}"
                )
            return used_ids
        return cls(validate_used_ids(used_ids, vocab_size), vocab_size)

    @property
    def num_used(self) -> int:
        return self.used_ids.numel()

    @functools.cached_property  # every compacted module of a model is marked with it
    def fingerprint(self) -> tuple[int, int, int]:
        """(V, U, CRC-32 of the ids): what optimizer checkpoints record to recognise this compaction."""
        return self.vocab_size, self.num_used, zlib.crc32(self.used_ids.numpy().tobytes())

    def save(self, directory: str | os.PathLike, trainable: Compaction | None = None) -> Path:
        """Writes `pema_compaction.json` (V, the used ids and, where only some rows train, the `trainable` ids)
        into `directory`; returns its path."""
        path = Path(directory) / COMPACTION_FILE
        saved = {"vocab_size": self.vocab_size, "used_ids": self.used_ids.tolist()}
        if trainable is not None and trainable is not self:
            saved["trainable_ids"] = trainable.used_ids.tolist()
        path.write_text(json.dumps(saved))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, ids: str = "used_ids") -> Compaction:
        """The compaction a checkpoint directory was written under (its `pema_compaction.json`), to resume with
        `replace_embeddings(model, Compaction.load(checkpoint))`; `ids="trainable_ids"` gives the rows that trained
        (the used ids where all did): `trainable_ids=Compaction.load(checkpoint, "trainable_ids")`."""
        if ids not in ("used_ids", "trainable_ids"):
            raise UsedIdsError(f"ids must be 'used_ids' or 'trainable_ids', got {ids!r}")
        path = Path(directory) / COMPACTION_FILE
        if not path.is_file():
            raise UsedIdsError(f"{directory} has no {COMPACTION_FILE}: it was not written by a compacted model")
        try:
            saved = json.loads(path.read_text())
            used_ids, vocab_size = saved[ids if ids in saved else "used_ids"], saved["vocab_size"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise UsedIdsError(f"{path} is not a {COMPACTION_FILE} as a compacted model writes it "
                               f"({type(err).__name__}: {err}); it holds {{\"vocab_size\": V, \"used_ids\": [...]}}"
                               ) from None
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise VocabularySizeError(f"{path}: vocab_size must be a positive int, got {vocab_size!r}")
        try:
            return cls.of(used_ids, vocab_size)
        except UsedIdsError as err:
            raise UsedIdsError(f"{path}: {err}") from None

    def subset(self, ids) -> Compaction:
        """The compaction of `ids` (validated, as :meth:`of`), which must all be used ids of this one."""
        try:
            subset = Compaction.of(ids, self.vocab_size)
        except UsedIdsError as err:
            raise UsedIdsError(f"trainable_ids: {err}") from None
        outside = subset.used_ids[~torch.isin(subset.used_ids, self.used_ids)]
        if outside.numel():
            raise UsedIdsError(f"trainable ids {format_ids(outside.tolist())} are not in used_ids: the trainable rows "
                               f"are a subset of the used ones (add them to used_ids, or scan the data they are in)")
        return subset

    def row_of(self, token_id: int) -> int:
        """The compact row of `token_id`, or -1 where it is not used (read on the CPU: no device sync)."""
        row = int(torch.searchsorted(self.used_ids, token_id))
        return row if row < self.num_used and int(self.used_ids[row]) == token_id else -1

    def remap(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The [V] int32 remap table on `device`."""
        return build_remap(self.used_ids.to(device), self.vocab_size)


def compact_rows(ids: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """[*] ids -> [N] int64 compact rows (flattened), -1 where an id has none (outside [0, V) or unused).

    An id outside [0, V) is never used as an index: it is masked before the table is read.
    """
    flat = ids.reshape(-1).long()
    in_vocab = (flat >= 0) & (flat < remap.numel())
    rows = remap[torch.where(in_vocab, flat, 0)].long()
    return torch.where(in_vocab, rows, -1)


def raise_for_out_of_range(
    ids: torch.Tensor, vocab_size: int, *, ignore_index: int | None = None, what: str = "token ids", hint: str = ""
) -> None:
    """Raises :class:`IdOutOfRangeError` naming the ids of `ids` outside [0, V) (other than `ignore_index`)."""
    flat = ids.reshape(-1).long()
    outside = (flat < 0) | (flat >= vocab_size)
    if ignore_index is not None:
        outside &= flat != ignore_index
    if bool(outside.any()):
        bad = torch.unique(flat[outside]).tolist()
        hint = hint or "check that the tokenizer matches the model"
        raise IdOutOfRangeError(f"{what} {format_ids(bad)} are outside the vocabulary [0, {vocab_size}); {hint}", bad)


def raise_for_bad_ids(ids: torch.Tensor, remap: torch.Tensor, what: str = "token ids") -> None:
    """Raises the typed error naming every id of `ids` that has no compact row; returns if there is none.

    Called after a kernel reported bad ids (or a cheap check failed), so this extra pass is off the good path.
    """
    raise_for_out_of_range(ids, remap.numel(), what=what)
    flat = ids.reshape(-1).long()
    unused = flat[compact_rows(flat, remap) < 0]
    if unused.numel():
        bad = torch.unique(unused).tolist()
        raise UnusedIdError(
            f"{what} {format_ids(bad)} are not in the used vocabulary the compacted model holds "
            f"(U={int((remap >= 0).sum())} of V={remap.numel()}); scan every split the model will see, "
            f"or pass these ids in `keep`",
            bad,
        )


def labels_to_columns(labels: torch.Tensor, remap: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Original-id labels -> compact column labels for `restricted` logits; `ignore_index` passes through.

    Raises:
        IdOutOfRangeError / UnusedIdError: a label outside [0, V) or not in the used set (naming the ids).
    """
    ignored = labels == ignore_index
    columns = compact_rows(torch.where(ignored, 0, labels), remap).view(labels.shape)
    if bool((columns[~ignored] < 0).any()):
        raise_for_bad_ids(labels[~ignored], remap, what="labels")
    return torch.where(ignored, labels, columns.to(labels.dtype))
