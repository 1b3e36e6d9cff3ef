"""The fused head + cross-entropy: the loss of `hidden @ head.T` without the [N, V] logits, a [U, D] head gradient.

By chunks of tokens, each chunk's transient memory bounded by `chunk_bytes`:
1. `z = h @ head.T` [n, V']: one GEMM in the compute dtype (cuBLAS on a GPU, the CPU's BLAS), the very product the
   unfused head computes;
2. the row pass (:func:`~pema_triton.ops.kernels.cross_entropy_rows` on a GPU, the reference elsewhere) turns `z`
   into the chunk's losses and, in place, its logit gradient;
3. `grad_hidden[chunk] = dz @ head` and `grad_weight += dz[:, used].T @ h` (fp32 accumulator [U, D]): two GEMMs.

No atomics anywhere, so the result does not depend on scheduling (`torch.use_deterministic_algorithms` holds).
The gradients are computed in the forward when autograd will want them, as Liger's fused loss does: a training
step runs three GEMMs over the head, not four (recomputing the logits in backward), and backward only scales what
was kept ([N, D] in the compute dtype, [U, D] fp32) by the upstream gradient. FLOPs per step, N tokens, V' columns,
U trainable: 2ND(2V' + U) against Liger's 2ND(2V' + V) on a full fine-tune whose head trains (0.73x at V = 152k,
U = 30k), and 6NDU in `restricted`, whose V' is U (0.2x).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from ._checks import accumulation_dtype, check_linear_cross_entropy_inputs
from .dispatch import kernels_or_reference, uses_kernels

__all__ = [
    "CHUNK_BYTES", "add_chunk_gradients", "add_product_fp32", "compact_linear_cross_entropy", "default_chunk_bytes",
    "tokens_per_chunk",
]

# A chunk's logits and the used columns of their gradient. On a GPU 512 MiB: 1,408 tokens at V = 152k, U = 30k in
# bf16, enough rows for cuBLAS to reach its peak (from about 1k rows at D = 4,096), a fraction of the unfused head's
# [N, V] logits (9.3 GiB in bf16 at N = 32k). On a CPU 256 MiB: the GEMMs (87% of a step) want rows there too. At
# SmolLM2's V = 49k, U = 26k, fp32, N = 2,048, one process, interleaved, median of 3, against 2,320 ms unfused:
# 64 MiB (128 tokens) 2,573 ms, 128 MiB 2,421, 256 MiB (768 tokens) 2,238, 512 MiB 2,196.
CHUNK_BYTES = {"cuda": 512 * 2**20, "cpu": 256 * 2**20}
# A quarter of the device's free memory at most: on a full GPU the chunk shrinks rather than failing the step.
_FREE_SHARE, _MIN_CHUNK_BYTES = 4, 16 * 2**20


def default_chunk_bytes(device: torch.device) -> int:
    """:data:`CHUNK_BYTES` of the device type, on CUDA held to a quarter of the free memory (read without a sync;
    not while torch.compile traces, where the budget must be a constant), and never below 16 MiB."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    if device.type == "cuda" and not torch.compiler.is_compiling():
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // _FREE_SHARE)
    return max(budget, _MIN_CHUNK_BYTES)


@dataclass(frozen=True)
class _LossParams:
    """What the autograd Function needs beyond its tensors (one argument, as apple/ml-cross-entropy passes them).

    ignore_index: the target whose loss is 0. compute_dtype: the GEMMs' dtype (the autocast dtype, else the
    hidden states'). chunk: tokens per chunk. rows: :mod:`~pema_triton.ops.kernels` or
    :mod:`~pema_triton.ops.reference`, whose `cross_entropy_rows` runs the row pass. grad_enabled: grad mode at
    the call (a Function's forward always runs without it, and its `needs_input_grad` ignores it: under
    `torch.no_grad()`, an evaluation, it still says True).
    """

    ignore_index: int
    compute_dtype: torch.dtype
    chunk: int
    rows: ModuleType
    grad_enabled: bool


class _CompactLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ head.T` over `denominator`, `head` being `full_weight` with its rows at
    `used_ids` refreshed from `weight` (or `weight` itself). Keeps the gradients, not its inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, full_weight, used_ids, targets, scale, denominator, params: _LossParams):
        if full_weight is None:
            head = weight.detach()
        else:  # the frozen buffer's used rows are stale until rewritten, as the frozen head's forward does
            head = full_weight.index_copy_(0, used_ids, weight.detach().to(full_weight.dtype))
        need_hidden, need_weight = (need and params.grad_enabled for need in ctx.needs_input_grad[:2])
        loss, grad_hidden, grad_weight = _loss_and_gradients(hidden, head, used_ids, weight.shape[0], targets, scale,
                                                             params, need_hidden, need_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss.sum() / denominator.to(loss.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_out.to(grad_hidden.dtype)).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_out.to(grad_weight.dtype)).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _loss_and_gradients(hidden, head, used_ids, num_rows, targets, scale, params: _LossParams, need_hidden: bool,
                        need_weight: bool):
    """([N] losses, [N, D] grad_hidden in the compute dtype or None, [U, D] fp32 grad_weight or None), by chunks."""
    num_tokens, dim = hidden.shape
    dtype = params.compute_dtype
    head = head.to(dtype)  # cast once per call under autocast, as nn.Linear's weight is, not once per chunk
    loss = torch.empty(num_tokens, dtype=accumulation_dtype(dtype), device=hidden.device)
    grad_hidden = hidden.new_empty(num_tokens, dim, dtype=dtype) if need_hidden else None
    grad_weight = hidden.new_zeros(num_rows, dim, dtype=accumulation_dtype(dtype)) if need_weight else None
    for start in range(0, num_tokens, params.chunk):
        rows = slice(start, start + params.chunk)
        h = hidden[rows].to(dtype)
        logits = h @ head.t()
        loss[rows] = params.rows.cross_entropy_rows(logits, targets[rows], scale[rows], params.ignore_index,
                                                    need_hidden or need_weight)
        # `logits` now holds the logit gradient
        add_chunk_gradients(logits, head, h, used_ids, None if grad_hidden is None else grad_hidden[rows], grad_weight)
    return loss, grad_hidden, grad_weight


def add_chunk_gradients(dz: torch.Tensor, head: torch.Tensor, h: torch.Tensor, used_ids: torch.Tensor | None,
                        grad_hidden_rows: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """A chunk's two gradient GEMMs from its logit gradient `dz` [n, V'] (compute dtype): `grad_hidden_rows[:] =
    dz @ head` ([n, D]) and `grad_weight += dz[:, used_ids].T @ h` (fp32 [U, D]; every column where `used_ids` is
    None); each skipped where its output is None."""
    if grad_hidden_rows is not None:
        torch.matmul(dz, head, out=grad_hidden_rows)
    if grad_weight is not None:
        used = dz if used_ids is None else dz.index_select(1, used_ids)
        add_product_fp32(grad_weight, used.t(), h)


# torch.addmm(..., out_dtype=torch.float32) of half inputs: CUDA only (the CPU build has no kernel for it). Set to
# False, with a warning, the first time a CUDA build refuses it: the exact fp32 GEMM then runs instead.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc` without rounding the product to `a`'s half dtype first: the head gradient
    sums one product per chunk of tokens (24 of them at N = 32k, V = 152k), and bf16 products summed in fp32 lose
    ~8 bits each time; on CUDA the GEMM still runs on half inputs (tensor cores) with an fp32 output."""
    global _ADDMM_OUT_DTYPE
    if a.is_cuda and _ADDMM_OUT_DTYPE and a.dtype in (torch.float16, torch.bfloat16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, NotImplementedError, TypeError) as error:  # a build without the dtype kernel
            _ADDMM_OUT_DTYPE = False
            warnings.warn(f"torch {torch.__version__} cannot add a {a.dtype} product into fp32 on CUDA "
                          f"({type(error).__name__}: {str(error)[:200]}); the head gradient's GEMM runs in fp32, "
                          f"exact but slower", RuntimeWarning, stacklevel=2)
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def tokens_per_chunk(num_tokens: int, width: int, num_used: int | None, dtype: torch.dtype,
                     chunk_bytes: int = CHUNK_BYTES["cuda"], upcast: bool = False) -> int:
    """Tokens per chunk: its logits [n, V'] and their gradient's used columns [n, U] (U = None: none gathered) in
    `dtype`, plus an fp32 copy of the logits where the row pass `upcast`s a half chunk (the reference's), within
    `chunk_bytes`; a multiple of 128 rows (GEMM tiles) where that leaves at least one."""
    size = torch.empty(0, dtype=dtype).element_size()
    per_token = (width + (num_used or 0)) * size + (width * 4 if upcast and size < 4 else 0)
    chunk = max(1, chunk_bytes // max(per_token, 1))
    chunk = chunk - chunk % 128 if chunk >= 128 else chunk
    return max(1, min(chunk, num_tokens))


def compact_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    full_weight: torch.Tensor | None,
    used_ids: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ head.T, targets)` for a head whose used rows train, without the [N, V] logits.

    The head is `full_weight` [V, D] whose rows at `used_ids` are `weight`'s (a `frozen` head's buffer: those rows
    are rewritten from `weight` here, in place, as the frozen head's forward does), or `weight` itself where
    `full_weight` is None (`restricted`: targets are its columns). Under autocast the GEMMs run in the autocast
    dtype, as `nn.Linear`'s would, and the logits are rounded to it as the unfused head's are; the softmax and the
    head gradient's accumulation are fp32.

    Args:
        hidden: [*, D]. weight: [U, D] trainable rows.
        full_weight: [V, D] or None. used_ids: [U] int64 rows of `full_weight` that are `weight`'s, or None.
        targets: [*] columns in [0, V) (or [0, U) without `full_weight`), or `ignore_index`.
        num_items_in_batch: divide the summed loss by this (the Trainer's gradient accumulation), else the mean
            over non-ignored tokens (NaN where every token is ignored, as `F.cross_entropy`).
        backend: the row pass's ("auto": Triton on a GPU); the GEMMs are torch's on every backend.
        chunk_bytes: a chunk's transient memory (its logits and their gradient's used columns); by default
            :func:`default_chunk_bytes` (512 MiB on a GPU, at most a quarter of its free memory; 256 MiB on a CPU).

    Returns:
        scalar fp32 loss (fp64 for fp64); gradients flow to `hidden` and to `weight` ([U, D]) only.
    """
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    check_linear_cross_entropy_inputs(flat_hidden, weight, full_weight, used_ids, flat_targets)
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    width = weight.shape[0] if full_weight is None else full_weight.shape[0]
    kernels = uses_kernels(backend, device)
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(device)
    chunk = tokens_per_chunk(flat_hidden.shape[0], width, None if used_ids is None else used_ids.numel(), dtype,
                             chunk_bytes, upcast=not kernels)
    params = _LossParams(ignore_index, dtype, chunk, kernels_or_reference(kernels), torch.is_grad_enabled())
    valid = flat_targets != ignore_index
    if num_items_in_batch is None:
        denominator = valid.sum().to(accumulation_dtype(dtype))
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=device).to(accumulation_dtype(dtype))
    scale = torch.where(valid, 1 / denominator, 0.0)
    with torch.autocast(device.type, enabled=False):
        return _CompactLinearCrossEntropy.apply(flat_hidden, weight, full_weight, used_ids, flat_targets.long(),
                                                scale, denominator, params)
