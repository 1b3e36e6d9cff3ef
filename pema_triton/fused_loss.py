"""The fused loss of `replace_embeddings(model, used_ids, output=..., fused_loss=True)`: the behaviour
:class:`FusedLoss` adds to a head mode (the modes themselves are in :mod:`pema_triton.modes`).

When the model is in training mode and called with `labels`, its causal-LM loss comes from
:func:`pema_triton.ops.compact_linear_cross_entropy`: no [N, V] (or [N, U]) logits, a [U, D] head gradient,
and exactly the model's own objective (the label shift, `ignore_index=-100`, the mean over non-ignored tokens, or
the sum over `num_items_in_batch` that the Trainer passes under gradient accumulation); `.logits` raises
:class:`NoLogitsError` (none were computed).
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

from .errors import NoLogitsError, PemaError, UnsupportedModuleError
from .fused_lm_head import has_adapted_forward
from .id_check import LabelCheck
from .model_patches import arguments_by_name
from .ops.linear_cross_entropy import compact_linear_cross_entropy

__all__ = ["FusedLoss", "FusedLossCall"]

# Config attributes of logit transforms the fused loss does not apply; any set (not None) is refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_PROBE_TOKENS = 8


@dataclass
class FusedLossCall:
    """One model call's fused loss on its way from hook to hook, kept on the head as `head.fused_call`.

    Lifecycle: made by `setup_head`, dropped by `teardown_head`. Every model call starts by `reset` (so nothing of
    a call that raised part-way reaches the next); the model's forward pre-hook `arm`s it with the targets; the
    head's forward takes them (`take_targets`) and leaves the loss (`loss`); the model's forward hook takes that
    (`take_loss`). Each take empties its field, so nothing outlives the call that set it.

    backend: replace_embeddings' `backend=`. probing: run the fused path in eval mode (the replace-time probe).
    loss_function: the model's `loss_function` at replace time (a later one is refused, not bypassed).
    targets: [*] shifted labels in original ids (or `ignore_index`). num_items_in_batch: the Trainer's
    denominator, or None. ignore_index: the target that counts for nothing (`model(..., ignore_index=)`).
    """

    backend: str = "auto"
    probing: bool = False
    loss_function: object = None
    targets: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | int | None = None
    ignore_index: int = -100
    loss: torch.Tensor | None = None

    def reset(self) -> None:
        self.targets = self.num_items_in_batch = self.loss = None
        self.ignore_index = -100

    def arm(self, targets: torch.Tensor, num_items_in_batch, ignore_index: int) -> None:
        self.targets, self.num_items_in_batch, self.ignore_index = targets, num_items_in_batch, ignore_index

    def take_targets(self) -> tuple[torch.Tensor | None, torch.Tensor | int | None, int]:
        taken = self.targets, self.num_items_in_batch, self.ignore_index
        self.targets = self.num_items_in_batch = None
        return taken

    def take_loss(self) -> torch.Tensor | None:
        loss, self.loss = self.loss, None
        return loss


class FusedLoss:
    """The fused-loss behaviour, mixed in before a head mode (frozen or restricted) that says its `loss_head`."""

    fused_loss = True

    def loss_head(self, head) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(full_weight [V, D], used_ids [U]) for :func:`~pema_triton.ops.compact_linear_cross_entropy`, or
        (None, None) where `head.weight` is the whole head (its columns the targets)."""
        raise NotImplementedError

    @property
    def fused(self):
        return self

    def setup_head(self, head, full_weight, full_bias):
        super().setup_head(head, full_weight, full_bias)
        head.fused_call = FusedLossCall()
        LabelCheck.attach(head, True)  # targets outside the vocabulary (check_ids= set by patch_model)

    def teardown_head(self, head):
        super().teardown_head(head)
        head.__dict__.pop("fused_call", None)
        LabelCheck.detach(head)

    def label_check_remap(self, handle, head):
        remap = super().label_check_remap(handle, head)
        return remap if remap is not None else _every_label_valid(head)

    def head_forward(self, head, hidden):
        targets, num_items, ignore_index = head.fused_call.take_targets()
        if targets is None:
            return super().head_forward(head, hidden)
        targets = _checked_targets(head, targets.to(hidden.device), ignore_index)
        full_weight, used_ids = self.loss_head(head)
        head.fused_call.loss = compact_linear_cross_entropy(
            hidden, head.weight, full_weight, used_ids, targets, num_items_in_batch=num_items,
            ignore_index=ignore_index, backend=head.fused_call.backend,
        )
        return hidden.new_empty(*hidden.shape[:-1], 0)  # the logits the model never needs: [..., 0]

    def patch_model(self, handle):
        super().patch_model(handle)
        _check_supported(handle)
        model, head = handle.model, handle.heads[0]
        head.fused_call.backend = handle.embeddings[0].backend  # the backend= of replace_embeddings
        head.fused_call.loss_function = getattr(model, "loss_function", None)
        head.label_check.mode = LabelCheck.mode_for(handle.embeddings[0].check_ids)
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
    call.reset()
    if not (model.training or call.probing) or has_adapted_forward(model):
        return None  # TRL's forward, adapted (pema_triton.fused_lm_head), takes the labels itself
    if "labels" not in kwargs and args:
        args, kwargs = arguments_by_name(model, args, kwargs)
    labels = kwargs.pop("labels", None)
    if labels is None:
        return args, kwargs
    _refuse_another_loss_function(call, model)
    ignore_index = kwargs.pop("ignore_index", -100)  # the model's loss takes it; so does this one
    targets = kwargs.pop("shift_labels", None)
    if targets is None:  # the model's own shift: token t predicts label t + 1, the last position nothing
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    _check_label_shape(targets, kwargs)
    call.arm(targets, kwargs.get("num_items_in_batch"), ignore_index)
    return args, kwargs


def _refuse_another_loss_function(call, model) -> None:
    if getattr(model, "loss_function", None) != call.loss_function:  # != : a bound method is made anew each time
        raise UnsupportedModuleError(
            f"{type(model).__name__}'s loss_function (or loss_type) changed after replace_embeddings(fused_loss=True): "
            "the fused loss computes the causal-LM cross-entropy the probe checked, not another objective; "
            "restore, set the loss, then compact with fused_loss=False"
        )


def _check_label_shape(targets: torch.Tensor, kwargs: dict) -> None:
    """Labels (or shift_labels) must be [batch, sequence] like the inputs: else a clear error, as the model's own
    loss would fail later with a shape mismatch deep in cross-entropy."""
    inputs = kwargs.get("input_ids")
    shape = tuple(inputs.shape) if inputs is not None else None
    if shape is None and kwargs.get("inputs_embeds") is not None:
        shape = tuple(kwargs["inputs_embeds"].shape[:-1])
    if shape is not None and tuple(targets.shape) != shape:
        raise PemaError(f"labels have shape {tuple(targets.shape)} but the inputs {shape}: a causal LM's labels are "
                        f"one token id (or -100) per input position")


def _checked_targets(head, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets outside [0, V) (other than `ignore_index`) are counted for the label check and count for nothing
    meanwhile: the error comes at this forward on CPU, a forward or two later on CUDA (no host sync), or at
    `handle.check_ids()`, as for the embedding's bad ids; no step trains on them in between."""
    width = head.out_features  # V, or U in `restricted` (whose targets are columns)
    bad = ((targets < 0) | (targets >= width)) & (targets != ignore_index)
    shown = torch.where(targets == ignore_index, 0, targets)  # what the error names: the bad ones only
    head.label_check.count(head, shown, bad, _every_label_valid(head))
    return torch.where(bad, ignore_index, targets)


def _every_label_valid(head) -> torch.Tensor:
    """A [V] "remap" with a row for every id (zero-strided: no memory), so the watch's error names only the labels
    outside [0, V), never an unused one: the fused loss's softmax runs over the whole vocabulary."""
    return torch.zeros(1, dtype=torch.int32, device=head.bad_label_count.device).expand(head.out_features)


def _give_loss(head, model, args, output):
    """Forward hook: the fused loss into the model's output, whose logits are None; a mixture-of-experts model's
    router load-balancing loss is added as the model adds it when it computes the loss itself."""
    loss = head.fused_call.take_loss()
    if loss is None:
        return None
    if isinstance(output, tuple):  # return_dict=False: the model's (loss, logits, ...) with labels
        return (loss, None, *output[1:])
    aux_loss = output.get("aux_loss")
    if aux_loss is not None:
        coefficient = getattr(model, "router_aux_loss_coef", getattr(model.config, "router_aux_loss_coef", 0.0))
        loss = loss + coefficient * aux_loss.to(loss.device)
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    return _without_logits(type(output)(loss=loss, logits=None, **fields))


_NO_LOGITS = "_pema_no_logits"  # instance flag, set once the output is built (its __post_init__ reads every field)
_NO_LOGITS_CLASSES: dict[type, type] = {}


def _without_logits(output):
    """`output` whose `.logits` raises :class:`NoLogitsError`: code that reads the logits of a fused training step
    (an accuracy metric, a custom `compute_loss`) learns why there are none, not `'NoneType' object has no
    attribute ...` deep inside. Its items, `to_tuple()`, `output[0]` and `getattr(..., None)` are unchanged. Under
    compile the plain output (Dynamo traces the model's own output class)."""
    if torch.compiler.is_compiling():
        return output
    cls = type(output)
    if cls not in _NO_LOGITS_CLASSES:
        _NO_LOGITS_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__getattribute__": _refuse_logits, "__reduce_ex__": _reduce_to_plain, "__repr__": _repr_as_plain,
            "__module__": __name__,
        })
    output.__class__ = _NO_LOGITS_CLASSES[cls]
    object.__setattr__(output, _NO_LOGITS, True)
    return output


def _refuse_logits(output, name: str):
    if name == "logits" and object.__getattribute__(output, "__dict__").get(_NO_LOGITS):
        raise NoLogitsError(
            "this output comes from a fused-loss training forward (replace_embeddings(..., fused_loss=True)), which "
            "computes the loss without logits; code that reads logits while training (token accuracy, entropy, a "
            "compute_loss of its own) needs fused_loss=False, or the model in eval mode, or called without labels"
        )
    return object.__getattribute__(output, name)


def _reduce_to_plain(output, protocol):
    """Pickled and copied as the model's own output class (this one exists in no module pickle can import)."""
    plain = type(output).__mro__[1]
    return _rebuild_output, (plain, dict(output.items()))


def _repr_as_plain(output) -> str:
    return repr(type(output).__mro__[1](**dict(output.items())))  # a dataclass repr reads every field


def _rebuild_output(cls, items):
    return cls(**items)


@torch.no_grad()
def _probe(handle) -> None:
    """The fused loss equals the model's own on a few used tokens (eval mode), or the mode is refused."""
    model, head = handle.model, handle.heads[0]
    if head.weight.is_meta:
        return
    ids = handle.compaction.used_ids[:_PROBE_TOKENS].to(head.weight.device)[None]
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
