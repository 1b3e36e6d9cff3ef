"""Fused-loss output modes: `replace_embeddings(model, used_ids, output=..., fused_loss=True)`.

When the model is in training mode and called with `labels`, its causal-LM loss comes from
:func:`pema_triton.head_ops.compact_linear_cross_entropy`: no [N, V] (or [N, U]) logits, a [U, D] head gradient,
and exactly the model's own objective (the label shift, `ignore_index=-100`, the mean over non-ignored tokens, or
the sum over `num_items_in_batch` that the Trainer passes under gradient accumulation); `.logits` is None.
Without labels, or in eval mode, the head runs as in its unfused mode, and `generate()` is unchanged.

How: a forward pre-hook takes the labels out of the call (so the model computes no loss of its own) and hands the
shifted targets to the head; the head, given targets, returns an empty [..., 0] tensor as its logits and keeps
the fused loss; a forward hook puts that loss in the output. What the fused path cannot reproduce (a bias on the
logits, logit soft-capping or scaling, an encoder-decoder) is refused at replace time, and a probe compares the
fused loss with the model's own on a few tokens, as converted modules are probed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .errors import PemaError, UnsupportedModuleError
from .head_ops import compact_linear_cross_entropy
from .modes import FROZEN, RESTRICTED, FrozenHead, OutputMode, RestrictedHead, arguments_by_name
from .remap import build_remap

__all__ = ["FUSED_FROZEN", "FUSED_RESTRICTED", "fused_mode"]

# Config attributes of logit transforms the fused loss does not apply; any set (not None) is refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_PROBE_TOKENS = 8


class _FusedLoss:
    """The fused-loss behaviour, mixed into a head mode (frozen or restricted)."""

    fused_loss = True

    def setup_head(self, head, full_weight, full_bias):
        super().setup_head(head, full_weight, full_bias)
        head.register_buffer("loss_remap", self.loss_remap(head), persistent=False)
        head.fused_targets = head.fused_loss_value = None

    def head_forward(self, head, hidden):
        pending = head.__dict__.get("fused_targets")
        if pending is None:
            return super().head_forward(head, hidden)
        targets, num_items = pending
        head.fused_targets = None
        head.fused_loss_value = compact_linear_cross_entropy(
            hidden, head.weight, self.frozen_matrix(head), head.loss_remap, targets.to(hidden.device),
            num_items_in_batch=num_items, backend=head.__dict__.get("loss_backend", "auto"),
        )
        return hidden.new_empty(*hidden.shape[:-1], 0)  # the logits the model never needs: [..., 0]

    def patch_model(self, handle):
        super().patch_model(handle)
        _check_supported(handle)
        model, head = handle.model, handle.heads[0]
        head.loss_backend = handle.embeddings[0].backend  # the backend= of replace_embeddings
        handle.on_undo(functools.partial(_forget_fused_state, head))
        pre = model.register_forward_pre_hook(functools.partial(_take_labels, head), with_kwargs=True)
        post = model.register_forward_hook(functools.partial(_give_loss, head))
        handle.on_undo(pre.remove)
        handle.on_undo(post.remove)
        _probe(handle)


class FusedFrozenHead(_FusedLoss, FrozenHead):
    """`frozen` with the fused loss: the head's rows from the compact Parameter (used ids) and the frozen buffer."""

    head_buffers = FrozenHead.head_buffers + ("loss_remap",)

    def loss_remap(self, head):
        return build_remap(head.used_ids, head.num_embeddings)

    def frozen_matrix(self, head):
        return head.frozen_weight


class FusedRestrictedHead(_FusedLoss, RestrictedHead):
    """`restricted` with the fused loss: a softmax over the U used rows, every one trainable."""

    head_buffers = RestrictedHead.head_buffers + ("loss_remap",)

    def loss_remap(self, head):
        return torch.arange(head.num_used, dtype=torch.int32, device=head.used_ids.device)

    def frozen_matrix(self, head):
        return head.weight  # never read: every column is trainable


FUSED_FROZEN, FUSED_RESTRICTED = FusedFrozenHead(), FusedRestrictedHead()
_FUSED = {id(FROZEN): FUSED_FROZEN, id(RESTRICTED): FUSED_RESTRICTED}


def fused_mode(mode: OutputMode) -> OutputMode:
    """The fused-loss variant of `mode` ("frozen" or "restricted")."""
    if id(mode) not in _FUSED:
        raise PemaError(f"fused_loss=True needs output='frozen' or 'restricted' (a compacted head), got {mode!r}")
    return _FUSED[id(mode)]


def _check_supported(handle) -> None:
    model, heads = handle.model, handle.heads
    config = getattr(model, "config", None)
    what = None
    if not heads:
        what = "no output embedding was compacted"
    elif heads[0].bias is not None:
        what = "its LM head has a bias"
    elif getattr(config, "is_encoder_decoder", False):
        what = "it is an encoder-decoder (the fused loss is the causal-LM loss)"
    else:
        what = next((f"its config sets {name}={getattr(config, name)!r}" for name in _LOGIT_TRANSFORMS
                     if getattr(config, name, None) not in (None, 1, 1.0)), None)
    if what is not None:
        raise UnsupportedModuleError(f"fused_loss=True cannot reproduce {type(model).__name__}'s loss: {what}; "
                                     f"use fused_loss=False")


def _forget_fused_state(head) -> None:
    for name in ("fused_targets", "fused_loss_value", "fused_probe", "loss_backend"):
        head.__dict__.pop(name, None)


def _take_labels(head, model, args, kwargs):
    """Forward pre-hook: in training (or while probing), labels become the head's targets, not the model's."""
    if not (model.training or head.__dict__.get("fused_probe")):
        return None
    if "labels" not in kwargs and args:
        args, kwargs = arguments_by_name(model, args, kwargs)
    labels = kwargs.pop("labels", None)
    if labels is None:
        return args, kwargs
    targets = kwargs.pop("shift_labels", None)
    if targets is None:  # the model's own shift: token t predicts label t + 1, the last position nothing
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
    head.fused_targets = (targets, kwargs.get("num_items_in_batch"))
    return args, kwargs


def _give_loss(head, model, args, output):
    """Forward hook: the fused loss into the model's output, whose logits are None."""
    loss = head.__dict__.get("fused_loss_value")
    if loss is None:
        return None
    head.fused_loss_value = None
    if isinstance(output, tuple):  # return_dict=False: the model's (loss, logits, ...) with labels
        return (loss, None, *output[1:])
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    return type(output)(loss=loss, logits=None, **fields)


@torch.no_grad()
def _probe(handle) -> None:
    """The fused loss equals the model's own on a few used tokens (eval mode), or the mode is refused."""
    model, head = handle.model, handle.heads[0]
    if head.weight.is_meta:
        return
    ids = handle.used_ids[:_PROBE_TOKENS].to(head.weight.device)[None]
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids, labels=ids).loss
        head.fused_probe = True
        fused = model(input_ids=ids, labels=ids).loss
    finally:
        head.fused_probe = False
        model.train(was_training)
    if own is None or fused is None or not torch.allclose(fused.float(), own.float(), rtol=1e-4, atol=1e-5):
        raise UnsupportedModuleError(
            f"fused_loss=True gives {None if fused is None else float(fused)} where {type(model).__name__}'s own "
            f"loss is {None if own is None else float(own)} on a probe: its forward computes the loss in a way the "
            f"fused path does not reproduce; use fused_loss=False"
        )
