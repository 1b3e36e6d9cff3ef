"""Compact-embedding lookup: `out[n, :] = weight[remap[ids[n]], :]`, remap fused into the gather."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_lookup_inputs
from ._common import count_into, launchable, load_compact_rows, on_tensors_device, pick_blocks


@triton.jit
def _lookup_kernel(
    ids_ptr,  # [N] original token ids, int32 or int64
    remap_ptr,  # [V] int32: compact row of each id, -1 if unused
    weight_ptr,  # [U, D] compact matrix, row-major
    out_ptr,  # [N, D] output, weight's dtype
    num_bad_ptr,  # [1] int32: incremented by the number of ids with no compact row
    N,  # number of ids
    V,  # vocabulary size (length of remap)
    D,  # embedding width
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_d = tl.program_id(1)
    o_n, m_n, b_rows, m_row = load_compact_rows(ids_ptr, remap_ptr, N, V, BLOCK_N)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if i_d == 0:
        # One program column counts, so each bad id is counted once; the launcher raises if any were seen.
        count_into(num_bad_ptr, m_n & ~m_row)

    m_tile = m_row[:, None] & m_d[None, :]
    b_w = tl.load(weight_ptr + b_rows[:, None] * D + o_d[None, :], mask=m_tile, other=0.0)
    # Every (n, d) of the output is written: bad ids get zeros, so no uninitialised memory escapes.
    tl.store(out_ptr + o_n[:, None] * D + o_d[None, :], b_w, mask=m_n[:, None] & m_d[None, :])


@on_tensors_device
def lookup(ids: torch.Tensor, remap: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton compact lookup. Same contract as :func:`pema_triton.ops.reference.lookup`.

    Args:
        ids: [*] original token ids, int32 or int64.
        remap: [V] int32 compact row of each id, -1 for unused.
        weight: [U, D] compact matrix (fp32, fp16, bf16 or fp64).

    Returns:
        out: [*ids.shape, D] in weight's dtype, zero rows where an id has no compact row.
        num_bad: [1] int32 count of ids with no compact row; the caller decides whether to raise.
    """
    check_lookup_inputs(ids, remap, weight)
    flat_ids = ids.reshape(-1).contiguous()
    weight = weight.contiguous()
    remap = remap.contiguous()
    num_ids, dim = flat_ids.numel(), weight.shape[1]
    out = torch.empty(num_ids, dim, dtype=weight.dtype, device=weight.device)
    num_bad = torch.zeros(1, dtype=torch.int32, device=weight.device)
    if num_ids and dim:
        block_n, block_d = pick_blocks(dim, max_elements=4096)
        grid = (triton.cdiv(num_ids, block_n), triton.cdiv(dim, block_d))
        launchable(_lookup_kernel)[grid](
            flat_ids, remap, weight, out, num_bad, num_ids, remap.numel(), dim, BLOCK_N=block_n, BLOCK_D=block_d
        )
    return out.view(*ids.shape, dim), num_bad
