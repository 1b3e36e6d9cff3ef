"""Forwards that read `lm_head.weight` themselves (TRL's), on a compacted model.

TRL's trainers replace `model.forward` with one that runs the backbone and multiplies the hidden states by
`lm_head.weight` in chunks, never calling the head module: TRL >= 1.15 for every trainer (`add_fused_lm_head`,
called with `fused_lm_head=True`), TRL 1.7 - 1.14 for SFT's default `loss_type="chunked_nll"`. Liger's and
Unsloth's fused cross-entropy patch the model class's forward the same way. On a compacted model that weight is the
[U, D] rows, so labels (ids in [0, V)) index the wrong rows: SFT's step-1 loss on real SmolLM2 was 17.08 instead
of 3.63 under TRL 1.16, with no error.

- :func:`refuse_foreign_head_readers`, a forward pre-hook of every model whose head is compacted, raises
  :class:`~pema_triton.errors.CompactWeightError` when the forward about to run comes from one of those packages
  and is not adapted: before any loss exists, so before any optimizer step.
- :func:`adapt_head_readers` (called by `replace_embeddings`, so when the trainer was built first, as
  :func:`pema_triton.hf.compact_trainer` has it) puts :class:`CompactFusedLMHead`
  or :class:`CompactChunkedNLL` in TRL's forward's place: the same record (loss, per-token log-probs, entropy,
  top-1, ...: what the installed TRL's holds) from
  :func:`~pema_triton.ops.linear_log_probs.compact_linear_log_probs`: no [N, V] logits, a [U, D] head gradient,
  the full-vocabulary softmax in `frozen` mode (U columns in `restricted`, whose labels arrive as columns).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .errors import CompactWeightError, UnsupportedModuleError
from .ops.linear_log_probs import UniformGradHint, compact_linear_log_probs

__all__ = ["CompactChunkedNLL", "CompactFusedLMHead", "adapt_head_readers", "has_adapted_forward",
           "refuse_foreign_head_readers"]

# Packages whose forwards multiply by lm_head.weight directly (TRL's fused head and chunked CE, Liger's and Unsloth's
# fused linear cross-entropy, Cut Cross-Entropy's patch).
_HEAD_READERS = ("trl", "liger_kernel", "unsloth", "unsloth_zoo", "cut_cross_entropy")


def refuse_foreign_head_readers(handle, model, args, kwargs) -> None:
    """Forward pre-hook: the forward about to run reads `lm_head.weight` itself and is not adapted."""
    package = _foreign_reader(model)
    if package is not None:
        raise CompactWeightError(
            f"{type(model).__name__}'s forward comes from {package!r}, which multiplies by lm_head.weight as if it "
            f"were the [V, D] matrix; it holds the {handle.compaction.num_used} used rows, so labels would index the "
            f"wrong rows. Under a TRL trainer, build it with the uncompacted model and then call "
            f"pema_triton.hf.compact_trainer(trainer), which adapts TRL's forward; otherwise turn that package's "
            f"fused loss off (replace_embeddings(..., fused_loss=True) is pema's own)"
        )


def _forwards(model):
    """The forward `model(...)` runs and each function it wraps (`__wrapped__`: functools.wraps, Accelerate's
    autocast and fp32 casts), outermost first."""
    forward = model.__dict__.get("forward", type(model).forward)
    for _ in range(8):
        if forward is None:
            return
        yield forward
        forward = getattr(forward, "__wrapped__", None)


def _package(forward) -> str:
    func = getattr(forward, "__func__", forward)
    return getattr(func, "__globals__", {}).get("__name__", "").partition(".")[0]


def has_adapted_forward(model) -> bool:
    """Whether `model`'s forward is one of pema's adapters (which take the labels themselves)."""
    return any(isinstance(forward, _CompactHeadForward) for forward in _forwards(model))


def _foreign_reader(model) -> str | None:
    for forward in _forwards(model):
        if isinstance(forward, _CompactHeadForward):
            return None  # adapted (and maybe wrapped since, by Accelerate)
        if _package(forward) in _HEAD_READERS:
            return _package(forward)
    return None


def adapt_head_readers(handle) -> bool:
    """Puts pema's head in place of TRL's forward on the compacted model, if it has one it knows; undone with the
    handle. Returns whether it did."""
    model = handle.model
    forward = model.__dict__.get("forward")
    func = getattr(forward, "__func__", None)
    if func is None or _package(forward) != "trl":
        return False
    adapters = {"_fused_forward": CompactFusedLMHead, "_chunked_ce_forward": CompactChunkedNLL}
    if func.__code__.co_name not in adapters:
        raise UnsupportedModuleError(f"TRL replaced the model's forward with {func.__code__.co_name}, which "
                                     f"pema_triton does not know; use a TRL version of the [trl] extra's range")
    handle.patch(model, "forward", adapters[func.__code__.co_name](handle, forward))
    return True


def _closure(func) -> dict:
    cells = func.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(func.__code__.co_freevars, cells)}


class _CompactHeadForward:
    """What both adapters share: TRL's settings from its forward's closure, and per-token statistics of the
    shifted labels from pema's head."""

    needs: tuple[str, ...] = ()  # closure names the adapted TRL forward must have
    backbone_attr = "base_model"  # TRL's fused head says which in its closure; 1.14's chunked forward uses this
    temperature, fp32_head = 1.0, False

    def __init__(self, handle, trl_forward):
        self.handle, self.trl_forward = handle, trl_forward
        # SFT's NLL differentiates -sum(log_probs) / N: one upstream value per token, so the head gradient is made in
        # the forward; the first trainer whose gradient is not uniform (GRPO, DPO, DFT) turns that off for good.
        self.uniform_grad_hint = UniformGradHint()
        settings = _closure(trl_forward.__func__)
        missing = set(self.needs) - settings.keys()
        if missing:
            raise UnsupportedModuleError(f"this TRL's forward has no {sorted(missing)}: an untested TRL version; use "
                                         f"one of the [trl] extra's range")
        if settings.get("final_logit_softcapping") is not None or settings.get("logit_scale", 1.0) != 1.0:
            raise UnsupportedModuleError("TRL's fused head on a model with logit soft-capping or scaling is not "
                                         "supported by the compact head")
        if any(getattr(head, "bias", None) is not None for head in handle.heads):
            raise UnsupportedModuleError("TRL's fused head on a model whose LM head has a bias (Phi, GPT-J, CodeGen) "
                                         "is not supported by the compact head; compact with output=None")
        # generate() validates its keywords against the forward's signature, which TRL kept the model's own.
        self.__signature__ = inspect.signature(trl_forward)
        self.settings = settings
        self.text_config = settings.get("text_config", handle.model.config)

    def _per_token(self, backbone, labels, shift_labels, outputs):
        """({name: [B, T'] statistic, zero where ignored}, [B, T'] mask of scored labels)."""
        head = self.handle.heads[0]
        hidden = backbone.last_hidden_state if shift_labels is not None else backbone.last_hidden_state[:, :-1]
        labels = (shift_labels if shift_labels is not None else labels[:, 1:]).to(head.weight.device)
        mask = labels != -100
        scored = hidden.to(head.weight.device)[mask]
        full_weight = head.refreshed_frozen_rows()  # None in `restricted`: the trainable rows are the whole head
        used = None if full_weight is None else head.used_ids
        # TRL's cast_lm_head_to_fp32: the head in fp32, outside autocast; otherwise the autocast dtype, if any.
        with torch.autocast(scored.device.type, enabled=False) if self.fp32_head else contextlib.nullcontext():
            stats = compact_linear_log_probs(scored.float() if self.fp32_head else scored, head.weight, full_weight,
                                             used, labels[mask], temperature=self.temperature, outputs=outputs,
                                             backend=self.handle.embeddings[0].backend,  # replace_embeddings'
                                             uniform_grad_hint=self.uniform_grad_hint)
        return {name: None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value)
                for name, value in stats.items()}, mask

    def _aux_loss(self, backbone, attention_mask):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        config = self.text_config
        aux = load_balancing_loss_func(backbone.router_logits, config.num_experts, config.num_experts_per_tok,
                                       attention_mask)
        return aux, getattr(config, "router_aux_loss_coef", 0.0) * aux


class CompactFusedLMHead(_CompactHeadForward):
    """TRL >= 1.15's `add_fused_lm_head`: without `fused_lm_head=True` TRL's forward (the model's own); with it,
    TRL's `FusedCausalLMOutput` from pema's head, with the temperature and outputs the trainer configured."""

    needs = ("temperature", "outputs", "cast_lm_head_to_fp32", "backbone_attr")

    def __init__(self, handle, trl_forward):
        super().__init__(handle, trl_forward)
        self.temperature, self.outputs = self.settings["temperature"], tuple(self.settings["outputs"])
        self.fp32_head, self.backbone_attr = self.settings["cast_lm_head_to_fp32"], self.settings["backbone_attr"]
        self.record = trl_forward.__func__.__globals__["FusedCausalLMOutput"]

    def __call__(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                 **kwargs):
        if not fused_lm_head:
            return self.trl_forward(*args, labels=labels, shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        if getattr(self.text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone = getattr(self.handle.model, self.backbone_attr)(*args, **kwargs)
        per_token, mask = self._per_token(backbone, labels, shift_labels, self.outputs)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss, aux_loss = -per_token["log_probs"].sum() / denominator, None
        if kwargs.get("output_router_logits"):
            aux_loss, weighted = self._aux_loss(backbone, kwargs.get("attention_mask"))
            loss = loss + weighted
        return self.record(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)


class CompactChunkedNLL(_CompactHeadForward):
    """TRL 1.7 - 1.14's SFT `loss_type="chunked_nll"`: with labels, its `_ChunkedCELMHeadOutput` (loss, and the
    counts of correct tokens, summed entropy and valid tokens its metrics read) from pema's head."""

    needs = ("original_forward",)

    def __call__(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, shift_labels=None,
                 output_router_logits=None, **kwargs):
        if labels is None and shift_labels is None:
            if output_router_logits is not None:
                kwargs["output_router_logits"] = output_router_logits
            return self.trl_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if output_router_logits is None:
            output_router_logits = getattr(self.text_config, "output_router_logits", False)
        kwargs.pop("use_cache", None)
        if output_router_logits:
            kwargs["output_router_logits"] = True
        backbone = getattr(self.handle.model, self.backbone_attr)(input_ids=input_ids, attention_mask=attention_mask,
                                                                   use_cache=False, **kwargs)
        per_token, mask = self._per_token(backbone, labels, shift_labels, ("entropy", "is_top1"))
        valid = mask.sum()
        loss = -per_token["log_probs"].sum() / (valid.clamp(min=1) if num_items_in_batch is None
                                                else num_items_in_batch)
        aux_loss = None
        if output_router_logits:
            aux_loss, weighted = self._aux_loss(backbone, attention_mask)
            loss = loss + weighted
        record = self.trl_forward.__func__.__globals__["_ChunkedCELMHeadOutput"]
        return record(loss=loss, logits=None, hidden_states=backbone.hidden_states, num_correct_tokens=(
            per_token["is_top1"] & mask).sum(), entropy_sum=per_token["entropy"].sum(), num_valid_tokens=valid,
            aux_loss=aux_loss)
