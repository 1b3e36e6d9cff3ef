"""The fused loss of `replace_embeddings(model, used_ids, output=..., fused_loss=True)`: the behaviour
:class:`FusedLoss` adds to a head mode (the modes themselves are in :mod:`pema_triton.modes`).

When the model is in training mode and called with `labels`, its causal-LM loss comes from
:func:`pema_triton.ops.compact_linear_cross_entropy`: no [N, V] (or [N, U]) logits, a [U, D] head gradient,
and exactly the model's own objective (the label shift, `ignore_index=-100`, the mean over non-ignored tokens, or
the sum over `num_items_in_batch` that the Trainer passes under gradient accumulation); `.logits` is None.
Without labels, or in eval mode, the head runs as in its unfused mode, and `generate()` is unchanged.

How: a forward pre-hook takes the labels out of the call (so the model computes no loss of its own) and hands the
shifted targets to the head through a :class:`FusedLossCall`; the head, given targets, returns an empty [..., 0]
tensor as its logits and leaves the fused loss there; a forward hook puts that loss in the output. What the fused
path cannot reproduce (a bias on the logits, logit soft-capping or scaling, an encoder-decoder) is refused at
replace time, and a probe compares the fused loss with the model's own on a few tokens, as converted modules are
probed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UnsupportedModuleError
from .model_patches import arguments_by_name
from .ops.linear_cross_entropy import compact_linear_cross_entropy

__all__ = ["FusedLoss", "FusedLossCall"]

# Config attributes of logit transforms the fused loss does not apply; any set (not None) is refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_PROBE_TOKENS = 8


@dataclass
class FusedLossCall:
    """One model call's fused loss on its way from hook to hook, kept on the head as `head.fused_call`.

    Lifecycle: made by `setup_head`, dropped by `teardown_head`. Per call, the model's forward pre-hook `arm`s it
    with the targets; the head's forward takes them (`take_targets`) and leaves the loss (`loss`); the model's
    forward hook takes that (`take_loss`). Each take empties its field, so nothing outlives the call that set it.

    backend: replace_embeddings' `backend=`. probing: run the fused path in eval mode (the replace-time probe).
    targets: [*] shifted labels in original ids (or -100). num_items_in_batch: the Trainer's denominator, or None.
    """

    backend: str = "auto"
    probing: bool = False
    targets: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | int | None = None
    loss: torch.Tensor | None = None

    def arm(self, targets: torch.Tensor, num_items_in_batch) -> None:
        self.targets, self.num_items_in_batch = targets, num_items_in_batch

    def take_targets(self) -> tuple[torch.Tensor | None, torch.Tensor | int | None]:
        taken = self.targets, self.num_items_in_batch
        self.targets = self.num_items_in_batch = None
        return taken

    def take_loss(self) -> torch.Tensor | None:
        loss, self.loss = self.loss, None
        return loss


class FusedLoss:
    """The fused-loss behaviour, mixed in before a head mode (frozen or restricted) that has a `loss_remap`."""

    fused_loss = True

    def loss_remap(self, head) -> torch.Tensor:
        """[V'] int32 table from the loss's target ids to rows of `head.weight` (-1: the row is in
        `self.frozen_rows(head)`), where V' is the width of the mode's logits."""
        raise NotImplementedError

    @property
    def fused(self):
        return self

    def setup_head(self, head, full_weight, full_bias):
        super().setup_head(head, full_weight, full_bias)
        head.register_buffer("loss_remap", self.loss_remap(head), persistent=False)
        head.fused_call = FusedLossCall()

    def teardown_head(self, head):
        super().teardown_head(head)
        head._buffers.pop("loss_remap", None)
        head.__dict__.pop("fused_call", None)

    def head_forward(self, head, hidden):
        targets, num_items = head.fused_call.take_targets()
        if targets is None:
            return super().head_forward(head, hidden)
        head.fused_call.loss = compact_linear_cross_entropy(
            hidden, head.weight, self.frozen_rows(head), head.loss_remap, targets.to(hidden.device),
            num_items_in_batch=num_items, backend=head.fused_call.backend,
        )
        return hidden.new_empty(*hidden.shape[:-1], 0)  # the logits the model never needs: [..., 0]

    def patch_model(self, handle):
        super().patch_model(handle)
        _check_supported(handle)
        model, head = handle.model, handle.heads[0]
        head.fused_call.backend = handle.embeddings[0].backend  # the backend= of replace_embeddings
        pre = model.register_forward_pre_hook(functools.partial(_take_labels, head), with_kwargs=True)
        post = model.register_forward_hook(functools.partial(_give_loss, head))
        handle.on_undo(pre.remove)
        handle.on_undo(post.remove)
        _probe(handle)


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


def _take_labels(head, model, args, kwargs):
    """Forward pre-hook: in training (or while probing), labels become the head's targets, not the model's."""
    call = head.fused_call
    if not (model.training or call.probing):
        return None
    if "labels" not in kwargs and args:
        args, kwargs = arguments_by_name(model, args, kwargs)
    labels = kwargs.pop("labels", None)
    if labels is None:
        return args, kwargs
    targets = kwargs.pop("shift_labels", None)
    if targets is None:  # the model's own shift: token t predicts label t + 1, the last position nothing
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
    call.arm(targets, kwargs.get("num_items_in_batch"))
    return args, kwargs


def _give_loss(head, model, args, output):
    """Forward hook: the fused loss into the model's output, whose logits are None."""
    loss = head.fused_call.take_loss()
    if loss is None:
        return None
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
        head.fused_call.probing = True
        fused = model(input_ids=ids, labels=ids).loss
    finally:
        head.fused_call.probing = False
        model.train(was_training)
    if own is None or fused is None or not torch.allclose(fused.float(), own.float(), rtol=1e-4, atol=1e-5):
        raise UnsupportedModuleError(
            f"fused_loss=True gives {None if fused is None else float(fused)} where {type(model).__name__}'s own "
            f"loss is {None if own is None else float(own)} on a probe: its forward computes the loss in a way the "
            f"fused path does not reproduce; use fused_loss=False"
        )
