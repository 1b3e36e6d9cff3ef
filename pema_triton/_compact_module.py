"""What `CompactEmbedding` and `CompactLMHead` share: the in-place class swap, the compact Parameters (copied from
the used rows or shared with a tied module), and merging trained rows back into a full matrix."""

from __future__ import annotations

import torch
from torch import nn

from .errors import PemaError, UnsupportedModuleError

_COMPACT_CLASSES: dict[tuple[type, type], type] = {}
_MADE_FROM: dict[type, tuple[type, type]] = {}  # each class compact_class made -> (compact, original)


def compact_class(compact: type, original: type) -> type:
    """The class a module of class `original` becomes when compacted in place.

    For a subclass of nn.Embedding / nn.Linear (e.g. Gemma's or BART's scaled word embedding, whose forward is
    `super().forward(ids) * embed_scale`) this is `Compact<Original>(Original, compact)`: its MRO puts the compact
    forward where the subclass's `super()` looks, so the subclass's extra behaviour is kept.
    """
    if original in (nn.Embedding, nn.Linear):
        return compact
    key = (compact, original)
    if key not in _COMPACT_CLASSES:
        name = f"Compact{original.__name__}"
        _COMPACT_CLASSES[key] = made = type(name, (original, compact), {"__module__": compact.__module__})
        _MADE_FROM[made] = key
    return _COMPACT_CLASSES[key]


def reduce_compact(module, protocol):
    """`__reduce_ex__` of the compact modules: a class `compact_class` made exists in no module, so pickle
    (`torch.save(model)`) cannot name it; such a module is rebuilt from the two classes it was made of, which it
    can. `copy.deepcopy` goes the same way."""
    if type(module) not in _MADE_FROM:
        return object.__reduce_ex__(module, protocol)
    return _rebuild_compact, _MADE_FROM[type(module)], module.__getstate__()


def _rebuild_compact(compact: type, original: type):
    return object.__new__(compact_class(compact, original))  # pickle then calls __setstate__ with its state


def check_convertible(module: nn.Module, compact: type, base: type) -> None:
    """Raises unless `module` is a `base` (nn.Embedding / nn.Linear) that is not compact already."""
    if isinstance(module, compact):
        raise PemaError(f"{type(module).__name__} is already compact")
    if not isinstance(module, base):
        raise UnsupportedModuleError(f"{compact.__name__} needs an nn.{base.__name__}, got {type(module).__name__}")


def compact_parameter(
    full: torch.Tensor, used_ids: torch.Tensor, shared: nn.Parameter | None, what: str
) -> nn.Parameter:
    """The trainable [U, ...] rows of `full` [V, ...]: `shared` where given (one Parameter for every module of a
    tied matrix), else a detached copy of the used rows, so the compact module never aliases the original storage.
    """
    shape = (used_ids.numel(), *full.shape[1:])
    if shared is None:
        rows = full.detach().index_select(0, used_ids.to(full.device)).clone()
        return nn.Parameter(rows, requires_grad=full.requires_grad)
    if tuple(shared.shape) != shape or shared.dtype != full.dtype:
        raise PemaError(
            f"shared {what} must be {list(shape)} {full.dtype} (the used rows), got {list(shared.shape)} {shared.dtype}"
        )
    return shared


@torch.no_grad()
def merge_rows(
    target: torch.Tensor, used_ids: torch.Tensor, rows: torch.Tensor, vocab_size: int, name: str
) -> torch.Tensor:
    """Writes the trained `rows` [U, ...] into `target` [V, ...] at `used_ids`, in place; other rows untouched."""
    expected = (vocab_size, *rows.shape[1:])
    if tuple(target.shape) != expected:
        raise PemaError(f"{name} must have shape {expected} (the full vocabulary), got {tuple(target.shape)}")
    return target.index_copy_(0, used_ids.to(target.device), rows.detach().to(target))
