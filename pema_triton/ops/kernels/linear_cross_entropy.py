"""Fused LM head + cross-entropy over a head whose U used rows train: no [N, V] logits, no [V, D] gradient.

Each vocabulary block of the head is gathered on the fly: a row whose id has a compact row (remap >= 0) comes from
the trainable [U, D] `weight`, any other from the [V, D] `frozen_weight`, so nothing [V, D] is written per step.
- forward: one program per block of tokens streams every vocabulary block, keeping an online log-sum-exp and the
  target's logit; it writes two floats per token.
- backward: one program per (token block, vocabulary block) recomputes its logit tile, turns it into the softmax
  gradient and adds its share of the hidden gradient [N, D] and of the compact rows' gradient [U, D] (fp32
  accumulators, relaxed atomics: only the next kernel on the stream reads them). Frozen rows get none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._checks import check_linear_cross_entropy_inputs
from ._common import INTERPRET, on_tensors_device


@triton.jit
def _head_tile(weight_ptr, frozen_ptr, b_rows, o_v, m_v, o_d, m_d, D: tl.constexpr, IN_DTYPE: tl.constexpr):
    """[BLOCK_V, BLOCK_D] rows `o_v` of the head, columns `o_d`, in IN_DTYPE: a trainable row (compact row
    `b_rows` >= 0) from `weight`, any other from `frozen`; each element is read from exactly one of them."""
    m_d = m_d[None, :]
    b_w = tl.load(frozen_ptr + o_v[:, None] * D + o_d[None, :], mask=(m_v & (b_rows < 0))[:, None] & m_d,
                  other=0.0).to(IN_DTYPE)
    b_w += tl.load(weight_ptr + b_rows[:, None] * D + o_d[None, :], mask=(m_v & (b_rows >= 0))[:, None] & m_d,
                   other=0.0).to(IN_DTYPE)
    return b_w


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, frozen_ptr, o_n, m_n, b_rows, o_v, m_v, D: tl.constexpr,
                BLOCK_D: tl.constexpr, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_N, BLOCK_V] logits (ACC_DTYPE) of tokens `o_n` for ids `o_v` (compact rows `b_rows`, -1 if frozen).

    Operands are rounded to IN_DTYPE (the compute dtype) and multiplied as DOT_DTYPE: the same, except under the
    interpreter, whose half-precision dot is wrong, where the rounded values are multiplied in fp32.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_h = tl.load(hidden_ptr + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = _head_tile(weight_ptr, frozen_ptr, b_rows, o_v, m_v, o_d, m_d, D, IN_DTYPE)
        b_h = b_h.to(IN_DTYPE).to(DOT_DTYPE)
        acc = tl.dot(b_h, tl.trans(b_w.to(DOT_DTYPE)), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _forward_kernel(
    hidden_ptr,  # [N, D] hidden states
    weight_ptr,  # [U, D] trainable rows
    frozen_ptr,  # [V, D] frozen rows (read where remap is -1)
    remap_ptr,  # [V] int32 compact row of each id, -1 for a frozen one
    targets_ptr,  # [N] int64 target ids, or IGNORE
    loss_ptr,  # [N] fp32 out: lse - target logit, 0 where ignored
    lse_ptr,  # [N] fp32 out: log-sum-exp over all V
    N,  # tokens; the vocabulary V and width D are compile-time: one model compiles once
    IGNORE: tl.constexpr, V: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(targets_ptr + o_n, mask=m_n, other=IGNORE)
    b_max = tl.full([BLOCK_N], float("-inf"), ACC_DTYPE)
    b_sum = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    b_target = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for v0 in range(0, V, BLOCK_V):
        # int64: the frozen rows' offsets o_v * D pass 2^31 once V * D does (V = 152k at D = 14,336)
        o_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        m_v = o_v < V
        b_rows = tl.load(remap_ptr + o_v, mask=m_v, other=-1).to(tl.int64)
        b_logits = _logit_tile(hidden_ptr, weight_ptr, frozen_ptr, o_n, m_n, b_rows, o_v, m_v, D, BLOCK_D,
                               IN_DTYPE, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_N, BLOCK_V)
        b_logits = tl.where(m_v[None, :], b_logits, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_logits, axis=1))
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.sum(tl.exp(b_logits - b_new[:, None]), axis=1)
        b_max = b_new
        b_target += tl.sum(tl.where(o_v[None, :] == b_t[:, None], b_logits, 0.0), axis=1)
    b_lse = b_max + tl.log(b_sum)
    tl.store(lse_ptr + o_n, b_lse.to(lse_ptr.dtype.element_ty), mask=m_n)
    b_loss = tl.where(b_t != IGNORE, b_lse - b_target, 0.0)
    tl.store(loss_ptr + o_n, b_loss.to(loss_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _backward_kernel(
    hidden_ptr,  # [N, D] hidden states
    weight_ptr,  # [U, D] trainable rows
    frozen_ptr,  # [V, D] frozen rows
    remap_ptr,  # [V] int32
    targets_ptr,  # [N] int64
    lse_ptr,  # [N] fp32 from the forward
    grad_loss_ptr,  # [N] fp32 weight of each token's loss (0 where ignored)
    grad_hidden_ptr,  # [N, D] fp32 accumulator, zero-initialised
    grad_weight_ptr,  # [U, D] fp32 accumulator, zero-initialised
    N,  # tokens
    V: tl.constexpr, D: tl.constexpr,  # as in the forward
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_rows = tl.load(remap_ptr + o_v, mask=m_v, other=-1).to(tl.int64)
    m_trainable = m_v & (b_rows >= 0)
    b_t = tl.load(targets_ptr + o_n, mask=m_n, other=-1)
    b_lse = tl.load(lse_ptr + o_n, mask=m_n, other=0.0)
    b_g = tl.load(grad_loss_ptr + o_n, mask=m_n, other=0.0)
    b_logits = _logit_tile(hidden_ptr, weight_ptr, frozen_ptr, o_n, m_n, b_rows, o_v, m_v, D, BLOCK_D,
                           IN_DTYPE, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_N, BLOCK_V)
    b_p = tl.where(m_v[None, :], tl.exp(b_logits - b_lse[:, None]), 0.0)
    b_dlogits = (b_p - tl.where(o_v[None, :] == b_t[:, None], 1.0, 0.0)) * b_g[:, None]
    # The gradient GEMMs take the logit gradient in the compute dtype, as autograd's would for a half head.
    b_dlogits = b_dlogits.to(IN_DTYPE).to(DOT_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_h = tl.load(hidden_ptr + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = _head_tile(weight_ptr, frozen_ptr, b_rows, o_v, m_v, o_d, m_d, D, IN_DTYPE)
        b_dh = tl.dot(b_dlogits, b_w.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=ACC_DTYPE)
        tl.atomic_add(grad_hidden_ptr + o_n[:, None] * D + o_d[None, :], b_dh, mask=m_n[:, None] & m_d[None, :],
                      sem="relaxed")
        b_dw = tl.dot(tl.trans(b_dlogits), b_h.to(IN_DTYPE).to(DOT_DTYPE), input_precision=PRECISION,
                      out_dtype=ACC_DTYPE)
        tl.atomic_add(grad_weight_ptr + b_rows[:, None] * D + o_d[None, :], b_dw,
                      mask=m_trainable[:, None] & m_d[None, :], sem="relaxed")


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def _fp32_dot_precision() -> str:
    """"tf32" where the user let fp32 matmuls use TF32 (`torch.set_float32_matmul_precision("high")`, or
    `torch.backends.cuda.matmul.fp32_precision = "tf32"`), as the unfused head's cuBLAS GEMM then does; else "ieee"."""
    if torch.version.hip:  # Triton's tf32 dot is not on every AMD architecture: the exact products there
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; "none" inherits the global setting
    if precision is None:
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


def _config(hidden: torch.Tensor, compute_dtype: torch.dtype | None) -> dict:
    dtype = compute_dtype or hidden.dtype
    wide = dtype in (torch.float32, torch.float64)
    in_dtype = _TL_DTYPES[dtype]
    return dict(
        IN_DTYPE=in_dtype,
        DOT_DTYPE=in_dtype if wide or not INTERPRET else tl.float32,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        PRECISION=_fp32_dot_precision(),  # as the unfused fp32 GEMM computes them (ignored for half inputs)
        # Under the interpreter every program runs serially in numpy: few, large tiles.
        BLOCK_N=32 if INTERPRET else 64, BLOCK_V=64, BLOCK_D=64,
    )


def _acc_dtype(hidden, compute_dtype):
    return torch.float64 if (compute_dtype or hidden.dtype) == torch.float64 else torch.float32


def _operands(hidden, weight, frozen_weight, compute_dtype):
    """The interpreter converts fp32 to bf16 by truncation where a GPU rounds to nearest: it gets operands cast
    by torch beforehand (copies, which only CPU tests pay). On a GPU the kernels round each tile as they load it."""
    if INTERPRET and compute_dtype is not None:
        return hidden.to(compute_dtype), weight.to(compute_dtype), frozen_weight.to(compute_dtype)
    return hidden, weight, frozen_weight


@on_tensors_device
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, frozen_weight: torch.Tensor, remap: torch.Tensor,
    targets: torch.Tensor, ignore_index: int = -100, compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused head + loss, with the contract of :func:`pema_triton.ops.reference.linear_cross_entropy`."""
    check_linear_cross_entropy_inputs(hidden, weight, frozen_weight, remap, targets)
    hidden, weight, frozen_weight = _operands(hidden, weight, frozen_weight, compute_dtype)
    hidden, targets = hidden.contiguous(), targets.contiguous().long()
    num_tokens, dim = hidden.shape
    loss = torch.empty(num_tokens, dtype=_acc_dtype(hidden, compute_dtype), device=hidden.device)
    lse = torch.empty_like(loss)
    if num_tokens:
        config = _config(hidden, compute_dtype)
        grid = (triton.cdiv(num_tokens, config["BLOCK_N"]),)
        wrap_triton(_forward_kernel)[grid](
            hidden, weight.contiguous(), frozen_weight.contiguous(), remap.contiguous(), targets, loss, lse,
            num_tokens, IGNORE=ignore_index, V=remap.numel(), D=dim, **config,
        )
    return loss, lse


@on_tensors_device
def linear_cross_entropy_backward(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, frozen_weight: torch.Tensor,
    remap: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward, with the contract of :func:`pema_triton.ops.reference.linear_cross_entropy_backward`."""
    check_linear_cross_entropy_inputs(hidden, weight, frozen_weight, remap, targets)
    hidden, weight, frozen_weight = _operands(hidden, weight, frozen_weight, compute_dtype)
    hidden, targets = hidden.contiguous(), targets.contiguous().long()
    num_tokens, dim = hidden.shape
    acc_dtype = _acc_dtype(hidden, compute_dtype)
    grad_hidden = torch.zeros(num_tokens, dim, dtype=acc_dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=hidden.device)
    if num_tokens:
        config = _config(hidden, compute_dtype)
        grid = (triton.cdiv(num_tokens, config["BLOCK_N"]), triton.cdiv(remap.numel(), config["BLOCK_V"]))
        wrap_triton(_backward_kernel)[grid](
            hidden, weight.contiguous(), frozen_weight.contiguous(), remap.contiguous(), targets, lse.contiguous(),
            grad_loss.to(acc_dtype).contiguous(), grad_hidden, grad_weight, num_tokens, V=remap.numel(), D=dim,
            **config,
        )
    return grad_hidden, grad_weight
