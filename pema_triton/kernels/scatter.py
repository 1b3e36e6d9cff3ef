"""Backward of the compact lookup: scatter `grad_out` rows into a [U, D] gradient, never [V, D].

Two variants:
- atomic (default): each program adds a [BLOCK_N, BLOCK_D] tile into a float32 accumulator with atomics.
  The order of additions to a row varies run to run, so results may differ in the last bits.
- deterministic: ids are sorted by compact row (stable) and each program reduces one row's segment in a fixed
  order, writing each output element exactly once. Chosen under `torch.use_deterministic_algorithms(True)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._checks import accumulation_dtype, check_scatter_inputs
from ..remap import compact_rows
from ._common import INTERPRET, load_compact_rows, pick_blocks


@triton.jit
def _scatter_atomic_kernel(
    grad_out_ptr,  # [N, D] upstream gradient
    ids_ptr,  # [N] original token ids, int32 or int64
    remap_ptr,  # [V] int32: compact row of each id, -1 if unused
    acc_ptr,  # [U, D] accumulator, float32 (float64 for float64 grads), zero-initialised
    N,  # number of ids
    V,  # vocabulary size
    D,  # embedding width
    padding_row,  # compact row that receives no gradient, or -1
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_n, m_n, b_rows, m_row = load_compact_rows(ids_ptr, remap_ptr, N, V, BLOCK_N)
    m_row = m_row & (b_rows != padding_row)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D

    m_tile = m_row[:, None] & m_d[None, :]
    b_g = tl.load(grad_out_ptr + o_n[:, None] * D + o_d[None, :], mask=m_tile, other=0.0)
    # Accumulate in fp32: bf16 atomics lose the low bits of every repeated id (and the interpreter lacks them).
    # Relaxed: the default (acq_rel) puts a full fence around every vectorised add; only the next kernel (the
    # cast) reads the accumulator.
    tl.atomic_add(acc_ptr + b_rows[:, None] * D + o_d[None, :], b_g.to(acc_ptr.dtype.element_ty), mask=m_tile,
                  sem="relaxed")


@triton.jit
def _scatter_segmented_kernel(
    grad_out_ptr,  # [N, D] upstream gradient
    order_ptr,  # [N] int64: token positions sorted by compact row (stable)
    seg_ptr,  # [U + 1] int64: tokens of row u are order[seg[u]:seg[u + 1]]
    grad_weight_ptr,  # [U, D] output in grad_out's dtype; every element written
    D,  # embedding width
    padding_row,  # compact row that receives no gradient, or -1
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    i_u = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    start = tl.load(seg_ptr + i_u)
    end = tl.load(seg_ptr + i_u + 1)
    if i_u == padding_row:
        end = start
    b_acc = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    # Fixed order (sorted position, then a fixed-shape tree sum per tile): bit-identical run to run.
    for t in range(start, end, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        m_t = o_t < end
        b_tok = tl.load(order_ptr + o_t, mask=m_t, other=0)
        b_g = tl.load(grad_out_ptr + b_tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_acc += tl.sum(b_g.to(ACC_DTYPE), axis=0)
    tl.store(grad_weight_ptr + i_u.to(tl.int64) * D + o_d, b_acc.to(grad_weight_ptr.dtype.element_ty), mask=m_d)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def lookup_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    remap: torch.Tensor,
    num_rows: int,
    padding_row: int = -1,
    deterministic: bool = False,
) -> torch.Tensor:
    """Triton backward of the compact lookup. Same contract as :func:`pema_triton.reference.lookup_backward`.

    Args:
        grad_out: [*ids.shape, D] upstream gradient.
        ids: [*] original token ids; remap: [V] int32 compact row of each id, -1 for unused.
        num_rows: U; padding_row: a compact row that gets no gradient, or -1.
        deterministic: sort + segmented reduction instead of atomics.

    Returns:
        grad_weight: [U, D] in grad_out's dtype, accumulated in float32 (float64 for float64).
    """
    check_scatter_inputs(grad_out, ids, remap, num_rows)
    dim = grad_out.shape[-1]
    flat_ids = ids.reshape(-1).contiguous()
    grad_2d = grad_out.reshape(-1, dim).contiguous()
    remap = remap.contiguous()
    num_ids = flat_ids.numel()
    acc_dtype = accumulation_dtype(grad_out.dtype)
    if deterministic:
        return _scatter_segmented(grad_2d, flat_ids, remap, num_rows, padding_row, acc_dtype)

    acc = torch.zeros(num_rows, dim, dtype=acc_dtype, device=grad_out.device)
    if num_ids and dim:
        block_n, block_d = pick_blocks(dim, max_elements=4096)
        grid = (triton.cdiv(num_ids, block_n), triton.cdiv(dim, block_d))
        wrap_triton(_scatter_atomic_kernel)[grid](
            grad_2d, flat_ids, remap, acc, num_ids, remap.numel(), dim, padding_row, BLOCK_N=block_n, BLOCK_D=block_d
        )
    return acc.to(grad_out.dtype)


def _scatter_segmented(
    grad_2d: torch.Tensor,
    flat_ids: torch.Tensor,
    remap: torch.Tensor,
    num_rows: int,
    padding_row: int,
    acc_dtype: torch.dtype,
) -> torch.Tensor:
    dim = grad_2d.shape[1]
    # An id with no row sorts first (as -1) and falls outside every segment, matching the atomic variant.
    rows = compact_rows(flat_ids, remap)
    sorted_rows, order = torch.sort(rows, stable=True)
    seg = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=rows.device))
    grad_weight = torch.empty(num_rows, dim, dtype=grad_2d.dtype, device=grad_2d.device)
    if dim:
        block_d = triton.next_power_of_2(dim) if INTERPRET else min(triton.next_power_of_2(dim), 256)
        block_t = max(1, min(128, 8192 // block_d)) if INTERPRET else 32
        grid = (num_rows, triton.cdiv(dim, block_d))
        wrap_triton(_scatter_segmented_kernel)[grid](
            grad_2d, order, seg, grad_weight, dim, padding_row,
            BLOCK_T=block_t, BLOCK_D=block_d, ACC_DTYPE=_TL_ACC[acc_dtype],
        )
    return grad_weight
