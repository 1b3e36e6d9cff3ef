"""The fused heads' row pass: a chunk of logits [n, V'] (from a cuBLAS GEMM) into per-token statistics and, in
place, the logit gradient the gradient GEMMs read.

One program per token row streams its V' logits twice: an online max / sum for the log-sum-exp and the target's
logit (and, where asked, the entropy's sum and the first maximum's column), then (WRITE_GRAD)
`(softmax - onehot(target)) * scale` written over the logits in their own dtype, as autograd's gradient of a
half-precision head is. Everything in between is fp32 (fp64 for fp64). No atomics: each element is written by
exactly one program, so the result does not depend on scheduling.

Bytes per logit: read twice and written once in the GEMM's dtype (6 B in bf16); at n = 1,792, V' = 151,936 a chunk
is 1.6 GB of traffic, ~0.4 ms at 4 TB/s, against ~3.3 ms for its [n, V'] x [V', 4096] GEMM at 700 TFLOP/s. The
same statistics from torch ops (TRL's log-probs: upcast, log-sum-exp, gather, argmax, log-softmax, exp, p log p,
sum, one-hot, downcast) read or write an fp32 [n, V'] some 14 times: ~50 B per logit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import LogProbRows, accumulation_dtype
from ._common import INTERPRET, launchable, on_tensors_device


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # [n, V] logits in the GEMM's dtype; overwritten with the logit gradient where WRITE_GRAD
    targets_ptr,  # [n] int64 target columns (a target outside [0, V) has no logit: its loss is the lse)
    scale_ptr,  # [n] fp32 d loss / d (token's loss) w.r.t. the raw logits: 1 / denominator (/ T), 0 where ignored
    loss_ptr,  # [n] fp32 / fp64 out: lse - target logit, 0 where ignored
    lse_ptr,  # [n] out (STATS): the log-sum-exp of the row over T
    entropy_ptr,  # [n] out (ENTROPY): -sum p log p
    argmax_ptr,  # [n] int64 out (TOP1): the column of the row's first maximum
    inv_temperature_ptr,  # [1] in the accumulation dtype (TEMPERATURE): the row is logits * 1 / T
    IGNORE: tl.constexpr, V: tl.constexpr,  # V compile-time: one model's head compiles once
    BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    STATS: tl.constexpr, ENTROPY: tl.constexpr, TOP1: tl.constexpr, TEMPERATURE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Read from memory, not passed as a scalar: a float argument is fp32, and 1 / 0.7 in fp32 is 2e-8 off in fp64.
    b_inv_t = tl.load(inv_temperature_ptr).to(ACC_DTYPE) if TEMPERATURE else 1.0
    b_t = tl.load(targets_ptr + row)
    row_ptr = logits_ptr + row * V  # int64: n * V passes 2^31 at n = 14,200 tokens of V = 152k
    # Per-lane running max and sum, folded at the end: one pass, no row max first. The max starts finite (-1e30,
    # below any logit) so that a lane past V (-inf) adds exp(-inf) = 0, never exp(-inf - -inf) = NaN.
    b_max = tl.full([BLOCK_V], -1e30, ACC_DTYPE)
    b_sum = tl.zeros([BLOCK_V], dtype=ACC_DTYPE)
    # ENTROPY: per lane sum exp(z - max) (z - max), rescaled with the max: the entropy then comes out as
    # log s - s2 / s from terms near 0, not as lse - E[z], which cancels to ~1e-6 absolute at |lse| ~ 10.
    b_shifted = tl.zeros([BLOCK_V], dtype=ACC_DTYPE)
    b_arg = tl.zeros([BLOCK_V], dtype=tl.int32)  # TOP1: each lane's first maximum (strict > keeps the first)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(row_ptr + o_v, mask=m_v, other=float("-inf")).to(ACC_DTYPE)
        b_z = b_z * b_inv_t if TEMPERATURE else b_z
        b_new = tl.maximum(b_max, b_z)
        b_rescale = tl.exp(b_max - b_new)
        b_exp = tl.exp(b_z - b_new)
        if ENTROPY:  # sum e (z - new) = rescale (s2 + (old - new) s) + exp(z - new) (z - new); 0 past V, not NaN
            b_shifted = b_rescale * (b_shifted + (b_max - b_new) * b_sum) + b_exp * tl.where(m_v, b_z - b_new, 0.0)
        if TOP1:
            b_arg = tl.where(b_z > b_max, o_v, b_arg)
        b_sum = b_sum * b_rescale + b_exp
        b_max = b_new
    row_max = tl.max(b_max, axis=0)
    b_weight = tl.exp(b_max - row_max)  # 0 for a lane that saw no logit (-1e30)
    row_sum = tl.sum(b_sum * b_weight, axis=0)
    b_lse = row_max + tl.log(row_sum)
    inside = (b_t >= 0) & (b_t < V)
    b_target = tl.load(row_ptr + tl.where(inside, b_t, 0)).to(ACC_DTYPE) * b_inv_t  # one element
    b_loss = tl.where(b_t != IGNORE, b_lse - tl.where(inside, b_target, 0.0), 0.0)
    tl.store(loss_ptr + row, b_loss.to(loss_ptr.dtype.element_ty))
    if STATS:
        tl.store(lse_ptr + row, b_lse.to(lse_ptr.dtype.element_ty))
    if ENTROPY:  # each lane's s2 moved from its max to the row's: s2 + (max - row_max) s, weighted
        row_shifted = tl.sum(b_weight * (b_shifted + tl.where(b_sum > 0, (b_max - row_max) * b_sum, 0.0)), axis=0)
        tl.store(entropy_ptr + row, (tl.log(row_sum) - row_shifted / row_sum).to(entropy_ptr.dtype.element_ty))
    if TOP1:  # the first column among the lanes holding the row's maximum
        tl.store(argmax_ptr + row, tl.min(tl.where(b_max == row_max, b_arg, V), axis=0).to(tl.int64))
    if WRITE_GRAD:
        _write_logit_gradient(row_ptr, b_t, b_lse, tl.load(scale_ptr + row).to(ACC_DTYPE), b_inv_t, V, BLOCK_V,
                              ACC_DTYPE, TEMPERATURE)


@triton.jit
def _write_logit_gradient(row_ptr, b_t, b_lse, b_scale, b_inv_t, V: tl.constexpr, BLOCK_V: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, TEMPERATURE: tl.constexpr):
    """The row's second pass: `(softmax - onehot(target)) * scale` over its logits, in their dtype."""
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(row_ptr + o_v, mask=m_v, other=0.0).to(ACC_DTYPE)
        b_z = b_z * b_inv_t if TEMPERATURE else b_z
        b_grad = (tl.exp(b_z - b_lse) - tl.where(o_v == b_t, 1.0, 0.0)) * b_scale
        tl.store(row_ptr + o_v, b_grad.to(row_ptr.dtype.element_ty), mask=m_v)


def block_v(vocab_size: int, stats: bool = False) -> int:
    """Logits per step of a row: 2,048 on a GPU (4 warps, 16 per thread: two 16-byte loads of bf16, and few enough
    registers for several programs per SM: at 4,096 the running max and sum took 167 registers on sm_90), 1,024
    where the entropy's sum and the top-1 column run beside them (two more per-lane arrays); under the
    interpreter, where programs run one by one in numpy, 1,024 (two steps at V = 1,500 in the tests)."""
    return min(triton.next_power_of_2(vocab_size), 1024 if INTERPRET or stats else 2048)


def _launch(logits, targets, scale, loss, write_grad, inv_temperature=None, lse=None, entropy=None, argmax=None,
            ignore_index=-100):
    num_tokens, vocab_size = logits.shape
    if not (num_tokens and vocab_size):
        return
    stats = lse is not None
    launchable(_cross_entropy_rows_kernel)[(num_tokens,)](
        logits, targets, scale, loss, loss if lse is None else lse, loss if entropy is None else entropy,
        targets if argmax is None else argmax, loss if inv_temperature is None else inv_temperature,
        IGNORE=ignore_index, V=vocab_size, BLOCK_V=block_v(vocab_size, entropy is not None or argmax is not None),
        ACC_DTYPE=tl.float64 if loss.dtype == torch.float64 else tl.float32, WRITE_GRAD=write_grad,
        STATS=stats, ENTROPY=entropy is not None, TOP1=argmax is not None, TEMPERATURE=inv_temperature is not None,
    )


@on_tensors_device
def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int = -100,
    write_grad: bool = True,
) -> torch.Tensor:
    """Triton row pass, with the contract of :func:`pema_triton.ops.reference.cross_entropy_rows`."""
    acc = accumulation_dtype(logits.dtype)
    loss = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    _launch(logits, targets, scale, loss, write_grad, ignore_index=ignore_index)
    return loss


@on_tensors_device
def log_prob_rows(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, entropy: bool = False,
    top1: bool = False, write_grad: bool = False,
) -> LogProbRows:
    """Triton row pass, with the contract of :func:`pema_triton.ops.reference.log_prob_rows`."""
    num_tokens = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss, lse = (torch.empty(num_tokens, dtype=acc, device=logits.device) for _ in range(2))
    ent = torch.empty_like(lse) if entropy else None
    argmax = torch.empty(num_tokens, dtype=torch.int64, device=logits.device) if top1 else None
    scale = torch.full_like(lse, 1 / temperature)  # d(-log p) / d logits = (p - onehot) / T
    inv_temperature = None if temperature == 1.0 else scale[:1]
    _launch(logits, targets, scale, loss, write_grad, inv_temperature, lse, ent, argmax)
    return LogProbRows(loss.neg_(), lse, ent, argmax, logits if write_grad else None)
