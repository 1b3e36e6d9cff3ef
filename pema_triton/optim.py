"""A learning rate of their own for the embedding rows, the way continued-pretraining and new-token recipes train
them (often 2-10x below the body's LR, as Unsloth's `embedding_learning_rate`).

- A plain loop: `torch.optim.AdamW(embedding_param_groups(model, lr=2e-4, embedding_lr=2e-5))`.
- A `transformers.Trainer` (TRL's trainers too): `set_embedding_lr(trainer, 2e-5)` before `train()`, or
  `compact_trainer(trainer, embedding_lr=2e-5)`. The Trainer still builds its own optimizer (`optim=`, its decay and
  no-decay groups, its kwargs); the embedding rows then move into groups of their own that copy every setting of the
  group they came from but the LR. The scheduler is built after, so it scales each group from its own LR.

"The embedding rows" are the trainable weights of the input embedding and the output embedding (LM head): compact
[U, D] rows on a compacted model, the full [V, D] matrices on a plain one (the same call works on both, so a
baseline trains alike), one Parameter where they are tied.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import PemaError
from .wrappers import inner_model

__all__ = ["embedding_param_groups", "embedding_parameters", "set_embedding_lr"]


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of `model`'s input and output embeddings, each once (tied: one).

    Raises:
        PemaError: the model has no input embedding, or none of these weights is trainable.
    """
    inner = inner_model(model)
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(inner, getter)() if hasattr(inner, getter) else None
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad and all(weight is not p for p in found):
            found.append(weight)
    if not found:
        raise PemaError(f"{type(model).__name__} has no trainable input or output embedding weight to give a "
                        f"learning rate of its own (frozen, or no get_input_embeddings())")
    return found


def embedding_param_groups(model: nn.Module, *, lr: float, embedding_lr: float, weight_decay: float | None = None,
                           embedding_weight_decay: float | None = None) -> list[dict]:
    """Two optimizer parameter groups: every other trainable parameter at `lr`, the embedding rows at
    `embedding_lr`; each with a weight decay where one is given (`embedding_weight_decay`, default
    `weight_decay`), else the optimizer's own.

    Example:
        >>> optimizer = torch.optim.AdamW(embedding_param_groups(model, lr=2e-4, embedding_lr=2e-5))  # doctest: +SKIP
    """
    rows = embedding_parameters(model)
    others = [p for p in model.parameters() if p.requires_grad and all(p is not r for r in rows)]
    decay = weight_decay if embedding_weight_decay is None else embedding_weight_decay
    groups = [{"params": others, "lr": lr}, {"params": rows, "lr": embedding_lr}]
    for group, value in zip(groups, (weight_decay, decay)):
        if value is not None:  # else the optimizer's default (AdamW(..., weight_decay=0.1) applies to both)
            group["weight_decay"] = value
    return groups


def set_embedding_lr(trainer, embedding_lr: float) -> None:
    """Makes `trainer` (a `transformers.Trainer` or subclass, before `train()`) train the embedding rows at
    `embedding_lr`: its `create_optimizer` is wrapped so that, once it has built the optimizer, the rows move into
    groups of their own with that LR. Call it after any compaction (`compact_trainer(..., embedding_lr=)` does):
    the rows are looked up when the optimizer is built.

    Raises:
        PemaError: the trainer has built its optimizer already (its rows would keep the LR it gave them).
    """
    if getattr(trainer, "optimizer", None) is not None:
        raise PemaError("set_embedding_lr changes how the trainer builds its optimizer, which it has done already; "
                        "call it before trainer.train() (or pass optimizers= built with embedding_param_groups)")
    original = trainer.create_optimizer
    trainer.create_optimizer = functools.partial(_create_optimizer, trainer, original, float(embedding_lr))


def _create_optimizer(trainer, create_optimizer, embedding_lr: float, *args, **kwargs):
    optimizer = create_optimizer(*args, **kwargs)
    _split_off_rows(optimizer, embedding_parameters(trainer.model), embedding_lr)
    return optimizer


def _split_off_rows(optimizer: torch.optim.Optimizer, rows: list[nn.Parameter], embedding_lr: float) -> None:
    """Moves `rows` out of the optimizer's groups into groups that copy theirs but for the LR (before any state)."""
    moved = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if any(p is r for r in rows)]
        if mine:
            group["params"] = [p for p in group["params"] if all(p is not r for r in mine)]
            moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine, "lr": embedding_lr})
    if not moved:
        raise PemaError("the trainer's optimizer holds none of the embedding rows (frozen, or optimizing another "
                        "copy of the model): no learning rate to set")
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]] + moved
