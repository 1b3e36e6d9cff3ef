"""Typed errors. Every error pema_triton raises on bad input is a :class:`PemaError`.

Each says what was wrong and what to do; none is raised after a module or model has been changed.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "PemaError",
    "PemaDTypeError",
    "TokenIdError",
    "IdOutOfRangeError",
    "UnusedIdError",
    "UsedIdsError",
    "UnsupportedModuleError",
    "BackendError",
    "AlreadyCompactedError",
    "NotCompactedError",
    "VocabularySizeError",
    "SaveDirectoryError",
    "ShardedModelError",
    "NoLogitsError",
    "CompactWeightError",
    "PemaWarning",
]

# How many offending ids an error message lists before it says "and N more".
_MAX_IDS_SHOWN = 10


class PemaError(ValueError):
    """Base class of every error pema_triton raises on bad input."""


class PemaDTypeError(PemaError, TypeError):
    """A tensor has a dtype the operation does not accept (float ids, an int weight, ...)."""


class TokenIdError(PemaError):
    """Token ids reaching a compact op that it cannot map to a compact row.

    Attributes:
        ids: the offending ids (sorted, unique, at most a few shown in the message).
    """

    def __init__(self, message: str, ids: Sequence[int]):
        super().__init__(message)
        self.ids = list(ids)


class IdOutOfRangeError(TokenIdError):
    """An id is outside [0, V) of the original vocabulary."""


class UnusedIdError(TokenIdError):
    """An id is inside the vocabulary but not in the used set the compact matrix holds."""


class UsedIdsError(PemaError):
    """The `used_ids` given to build a compact module are not sorted, unique int ids in [0, V)."""


class UnsupportedModuleError(PemaError):
    """A module (or a module option) that pema_triton cannot compact."""


class BackendError(PemaError, RuntimeError):
    """The requested backend cannot run here (e.g. `backend="triton"` on CPU without the interpreter)."""


class AlreadyCompactedError(PemaError):
    """`replace_embeddings` on a model that is already compacted."""


class NotCompactedError(PemaError):
    """`restore_embeddings` on a model that `replace_embeddings` did not compact."""


class VocabularySizeError(PemaError):
    """A vocabulary size that does not fit: a `vocab_size=` that is no positive int, or a checkpoint (or tensor)
    whose vocabulary size differs from the compacted model's V."""


class SaveDirectoryError(PemaError, FileExistsError):
    """`save_trimmed` into a directory that exists and is not empty (pass `overwrite=True` to replace it)."""


class ShardedModelError(PemaError):
    """An operation that cannot run while FSDP shards the compact rows (restoring the model)."""


class NoLogitsError(PemaError, AttributeError):
    """`.logits` read from a fused-loss training forward, which computes the loss without logits. An AttributeError,
    so `getattr(output, "logits", None)` still gives None."""


class CompactWeightError(PemaError):
    """Code about to use a compacted head's [U, D] weight as the full [V, D] matrix (TRL's fused LM head, read
    directly), which would score labels against the wrong rows."""


class PemaWarning(UserWarning):
    """Something likely unintended that is not an error (e.g. used ids missing the pad token)."""


def format_ids(ids: Sequence[int]) -> str:
    """`[3, 7, 9]`, or `[3, 7, ... (12 more)]` past :data:`_MAX_IDS_SHOWN` ids."""
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:_MAX_IDS_SHOWN])
    if len(ids) > _MAX_IDS_SHOWN:
        shown += f", ... ({len(ids) - _MAX_IDS_SHOWN} more)"
    return f"[{shown}]"
