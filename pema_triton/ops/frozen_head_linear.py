"""The `frozen` head's linear: full-vocabulary logits from a [V, D] buffer whose U used rows train."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["frozen_head_linear"]


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
