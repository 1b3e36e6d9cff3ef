"""Autograd ops of the LM head: the `frozen` head's linear, and the fused head + cross-entropy.

Both train only the U rows of a [V, D] head: their weight gradient is [U, D]. The fused op never builds the
[N, V] logits either: it streams the vocabulary by blocks (Triton kernels on GPU, `reference` chunks elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import implementation

__all__ = ["compact_linear_cross_entropy", "frozen_head_linear"]


class _FrozenHeadLinear(torch.autograd.Function):
    """`F.linear(hidden, frozen_weight, frozen_bias)` after writing the trainable rows into the frozen buffers.

    Backward returns [U, D] / [U] gradients for the trainable rows only: never a [V, D] gradient. Under autocast
    the forward's `F.linear` runs in the autocast dtype, so backward casts its operands to `grad_logits`' dtype,
    as the cast nodes of a plain `nn.Linear` would; autograd casts the results back to the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, frozen_weight, frozen_bias, used_ids):
        with torch.no_grad():
            frozen_weight.index_copy_(0, used_ids, weight)
            if bias is not None:
                frozen_bias.index_copy_(0, used_ids, bias)
        # The trainable `weight` is what autograd version-checks, as for nn.Linear: an in-place update between
        # forward and backward raises. The buffer is held on ctx, not saved: a second forward before backward
        # (chosen and rejected passes, a head called twice) rewrites it with the same rows, which is no error.
        ctx.save_for_backward(hidden, weight, used_ids)
        ctx.frozen_weight = frozen_weight
        ctx.has_bias = bias is not None
        return F.linear(hidden, frozen_weight, frozen_bias)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, _, used_ids = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_logits.matmul(ctx.frozen_weight.to(grad_logits.dtype))
        grad_used = grad_logits.index_select(-1, used_ids).reshape(-1, used_ids.numel())  # [B*T, U]
        if ctx.needs_input_grad[1]:
            grad_weight = grad_used.t().matmul(hidden.reshape(-1, hidden.shape[-1]).to(grad_logits.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_used.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def frozen_head_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    frozen_weight: torch.Tensor,
    frozen_bias: torch.Tensor | None,
    used_ids: torch.Tensor,
) -> torch.Tensor:
    """Full-vocabulary logits from a head whose used rows train and whose other rows are frozen.

    One GEMM over the whole [V, D] matrix, as the original head runs, so the logits match it bit for bit (two
    GEMMs over the used and unused rows differ in the last bit on CPU).

    Args:
        hidden: [*, D]. weight: [U, D] trainable rows; bias: [U] or None.
        frozen_weight: [V, D] buffer (its rows at `used_ids` are overwritten from `weight`); frozen_bias: [V] or None.
        used_ids: [U] int64, on the buffers' device.

    Returns:
        [*, V] logits; gradients flow to `hidden`, `weight` ([U, D]) and `bias` ([U]) only.
    """
    return _FrozenHeadLinear.apply(hidden, weight, bias, frozen_weight, frozen_bias, used_ids)


class _CompactLinearCrossEntropy(torch.autograd.Function):
    """Mean (or sum / `num_items`) cross-entropy of `hidden @ head.T`, the head's rows gathered from `weight`
    (trainable, via `remap`) and `frozen_weight`. Saves only [N] floats beyond its inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, frozen_weight, remap, targets, denominator, ignore_index, compute_dtype, impl):
        loss, lse = impl.linear_cross_entropy(hidden, weight, frozen_weight, remap, targets, ignore_index,
                                              compute_dtype)
        ctx.save_for_backward(hidden, weight, frozen_weight, remap, targets, lse, denominator)
        ctx.ignore_index, ctx.compute_dtype, ctx.impl = ignore_index, compute_dtype, impl
        return loss.sum() / denominator.to(loss.dtype)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        # Autocast off: a backward run inside an autocast region must not recast the chunked GEMMs.
        hidden, weight, frozen_weight, remap, targets, lse, denominator = ctx.saved_tensors
        grad_loss = torch.where(targets != ctx.ignore_index, grad_out.to(lse.dtype) / denominator, 0.0)
        grad_hidden, grad_weight = ctx.impl.linear_cross_entropy_backward(
            grad_loss, hidden, weight, frozen_weight, remap, targets, lse, ctx.compute_dtype
        )
        grad_hidden = grad_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def compact_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    frozen_weight: torch.Tensor,
    remap: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ head.T, targets)` for a head whose used rows train, without the [N, V] logits.

    The head's row v is `weight[remap[v]]` where `remap[v] >= 0` (trainable) and `frozen_weight[v]` elsewhere,
    exactly the matrix a `frozen` CompactLMHead multiplies by. Under autocast the logit GEMM runs in the autocast
    dtype, as `nn.Linear`'s would; the softmax and the accumulation are fp32.

    Args:
        hidden: [*, D]. weight: [U, D] trainable rows. frozen_weight: [V, D]. remap: [V] int32.
        targets: [*] ids in [0, V), or `ignore_index`.
        num_items_in_batch: divide the summed loss by this (the Trainer's gradient accumulation), else the mean
            over non-ignored tokens (NaN where every token is ignored, as `F.cross_entropy`).

    Returns:
        scalar fp32 loss; gradients flow to `hidden` and to `weight` ([U, D]) only.
    """
    impl = implementation(backend, hidden.device)
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    flat_targets = targets.reshape(-1)
    if num_items_in_batch is None:
        denominator = (flat_targets != ignore_index).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        return _CompactLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, frozen_weight, remap, flat_targets, denominator,
            ignore_index, compute_dtype, impl,
        )
