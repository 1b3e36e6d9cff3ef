"""The fused head + cross-entropy: the loss of `hidden @ head.T` without the [N, V] logits, a [U, D] head gradient.

It streams the vocabulary by blocks (Triton kernels on GPU, `reference` chunks elsewhere), so neither the [N, V]
logits nor a [V, D] head gradient ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from ..errors import BackendError, PemaError
from .dispatch import implementation, kernels_or_reference

__all__ = ["compact_linear_cross_entropy"]


@dataclass(frozen=True)
class _LossParams:
    """What the autograd Function needs beyond its tensors (one argument, as apple/ml-cross-entropy passes them).

    ignore_index: the target that contributes nothing. compute_dtype: the logit GEMM's input dtype (the autocast
    dtype) or None for the inputs' own. impl: :mod:`~pema_triton.ops.kernels` or :mod:`~pema_triton.ops.reference`.
    """

    ignore_index: int
    compute_dtype: torch.dtype | None
    impl: ModuleType


class _CompactLinearCrossEntropy(torch.autograd.Function):
    """Mean (or sum / `num_items`) cross-entropy of `hidden @ head.T`, the head's rows gathered from `weight`
    (trainable, via `remap`) and `frozen_weight`. Saves only [N] floats beyond its inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, frozen_weight, remap, targets, denominator, params: _LossParams):
        loss, lse = params.impl.linear_cross_entropy(hidden, weight, frozen_weight, remap, targets, params.ignore_index,
                                                     params.compute_dtype)
        ctx.save_for_backward(hidden, weight, frozen_weight, remap, targets, lse, denominator)
        ctx.params = params
        return loss.sum() / denominator.to(loss.dtype)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        # Autocast off: a backward run inside an autocast region must not recast the chunked GEMMs.
        hidden, weight, frozen_weight, remap, targets, lse, denominator = ctx.saved_tensors
        params = ctx.params
        grad_loss = torch.where(targets != params.ignore_index, grad_out.to(lse.dtype) / denominator, 0.0)
        grad_hidden, grad_weight = params.impl.linear_cross_entropy_backward(
            grad_loss, hidden, weight, frozen_weight, remap, targets, lse, params.compute_dtype
        )
        grad_hidden = grad_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def compact_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    frozen_weight: torch.Tensor | None,
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
        hidden: [*, D]. weight: [U, D] trainable rows. remap: [V] int32.
        frozen_weight: [V, D], read where `remap` is -1; None where every row trains (`restricted`: `remap` is
            `arange(U)`, V = U).
        targets: [*] ids in [0, V), or `ignore_index`.
        num_items_in_batch: divide the summed loss by this (the Trainer's gradient accumulation), else the mean
            over non-ignored tokens (NaN where every token is ignored, as `F.cross_entropy`).

    Returns:
        scalar fp32 loss; gradients flow to `hidden` and to `weight` ([U, D]) only.
    """
    if frozen_weight is None:
        if remap.numel() != weight.shape[0]:
            raise PemaError(f"frozen_weight=None needs a remap of the U = {weight.shape[0]} rows (every row "
                            f"trainable), got one of {remap.numel()} ids")
        # Read nowhere: with remap = arange(U) no row is frozen (no check: it would sync). A detached view, as
        # torch.compile cannot trace one tensor passed as two inputs of an autograd Function.
        frozen_weight = weight.detach()
    params = _LossParams(ignore_index, _autocast_dtype(hidden.device), _deterministic_or(backend, hidden.device))
    flat_targets = targets.reshape(-1)
    if num_items_in_batch is None:
        denominator = (flat_targets != ignore_index).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        return _CompactLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, frozen_weight, remap, flat_targets, denominator, params
        )


def _deterministic_or(backend: str, device: torch.device) -> ModuleType:
    """The implementation for `backend`, but under `torch.use_deterministic_algorithms(True)` never the kernels:
    their backward adds every vocabulary block's contribution with atomics, in no fixed order. The reference's
    chunks add in order (its index_add_ is deterministic when torch is asked to be)."""
    impl = implementation(backend, device)
    if impl is kernels_or_reference(True) and torch.are_deterministic_algorithms_enabled():
        if backend == "triton":
            raise BackendError("the Triton fused loss accumulates its backward with atomics, in no fixed order, and "
                               "torch.use_deterministic_algorithms(True) is on: use backend='auto' (the chunked "
                               "PyTorch path, deterministic, in this mode) or backend='torch'")
        impl = kernels_or_reference(False)
    return impl


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
