"""Backward of the compact lookup: scatter `grad_out` rows into a [U, D] gradient, never [V, D].

Two methods (`method=`), both accumulating in float32 (float64 for float64):
- "atomic": each program adds a [BLOCK_N, BLOCK_D] tile into a float32 accumulator with relaxed atomics. The
  order of additions to a row varies run to run (last-bit differences). The accumulator is the output for fp32;
  for bf16/fp16 it costs a [U, D] fp32 zero-fill and a cast on top (about 10 bytes per element, 1.23 GB at
  U = 30k, D = 4096), close to the full-vocabulary backward's own [V, D] zero-fill.
- "sorted": token positions are sorted by compact row, the sorted list is cut into equal chunks of tokens (so a
  hot row, 3-9% of all tokens in real text, is split across many programs rather than looped over by one), and
  each program reduces its chunk tile by tile with a segmented scan in registers. Rows wholly inside a chunk are
  written once, in the output dtype; a row crossing chunk boundaries leaves one fp32 partial per chunk, summed in
  chunk order by a second kernel. Bit-identical run to run.

`pema_triton.ops` picks the method ("auto"): sorted for bf16/fp16 and under
`torch.use_deterministic_algorithms(True)`, atomic otherwise (see `pema_triton.ops.lookup.backward_method`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import accumulation_dtype, check_scatter_inputs
from ..remap import compact_rows
from ._common import INTERPRET, launchable, load_compact_rows, on_tensors_device, pick_blocks

METHODS = ("atomic", "sorted")


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
def _segmented_add(k_left, v_left, k_right, v_right):
    # Segmented inclusive scan over sorted keys: a run of equal keys sums, a new key starts afresh. Associative
    # on non-decreasing keys, which the sort guarantees (masked lanes carry a key above every row).
    return k_right, v_right + tl.where(k_left == k_right, v_left, 0.0)


@triton.jit
def _mask_product(b_seg, b_x, DOT_FP32: tl.constexpr):
    """[BLOCK_T, BLOCK_D] fp32 product of a [BLOCK_T, BLOCK_T] 0/1 mask `b_seg` and a bf16/fp16 tile `b_x` on tensor
    cores; in fp32 where DOT_FP32 (the interpreter's for bf16: its bf16 dot is garbage)."""
    if DOT_FP32:
        return tl.dot(b_seg.to(tl.float32), b_x.to(tl.float32), input_precision="ieee")
    return tl.dot(b_seg.to(b_x.dtype), b_x, out_dtype=tl.float32)


@triton.jit
def _segment_sums(b_row, b_g, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  MMA: tl.constexpr, DOT_FP32: tl.constexpr):
    """[BLOCK_T, BLOCK_D] sums of a tile's gradient rows `b_g` by segment of equal sorted rows `b_row` [BLOCK_T]:
    at a segment's last row (the only one stored or carried), the sum of the segment's rows in the tile; other
    rows hold a partial sum (scan) or the same sum (MMA)."""
    if MMA:
        # Row i of the product sums the tile's rows of i's segment. Products of finite values by 0 or 1 are exact,
        # the sums fp32 in the tensor core's fixed order (bit-identical run to run, not IEEE round-to-nearest).
        # 0 x inf is NaN, so a tile holding a non-finite gradient is summed again by _nonfinite_segment_sums.
        b_sum = _mask_product(b_row[:, None] == b_row[None, :], b_g, DOT_FP32)
    else:
        b_key = tl.broadcast_to(b_row[:, None], (BLOCK_T, BLOCK_D))
        _, b_sum = tl.associative_scan((b_key, b_g.to(ACC_DTYPE)), 0, _segmented_add)
    return b_sum


@triton.jit
def _nonfinite_segment_sums(b_row, b_g, DOT_FP32: tl.constexpr):
    """The MMA's segment sums of a tile `b_g` [BLOCK_T, BLOCK_D] that holds an inf or a NaN, with the reference's
    IEEE outcome per segment: NaN if it holds a NaN or both infinities, else its infinity, else its finite sum.
    The finite values go through the mask product with the others zeroed; counts of +inf (code 1), -inf (64) and
    NaN (4096) through a second one, exact in fp32 (at most 32 x 4096 + 32 x 64 + 32 < 2^24)."""
    b_seg = b_row[:, None] == b_row[None, :]
    b_f = b_g.to(tl.float32)
    b_finite = tl.where(tl.abs(b_f) < float("inf"), b_f, 0.0)
    b_code = tl.where(b_f == float("inf"), 1.0, tl.where(b_f == -float("inf"), 64.0, tl.where(b_f != b_f, 4096.0, 0.0)))
    # Both exact in the gradient's dtype: its own finite values, and powers of two.
    b_sum = _mask_product(b_seg, b_finite.to(b_g.dtype), DOT_FP32)
    b_count = _mask_product(b_seg, b_code.to(b_g.dtype), DOT_FP32).to(tl.int32)
    pos, neg, nan = (b_count & 63) > 0, (b_count & 4095) >= 64, b_count >= 4096
    b_sum = tl.where(pos, float("inf"), tl.where(neg, -float("inf"), b_sum))
    return tl.where(nan | (pos & neg), float("nan"), b_sum)


@triton.jit
def _chunk_open_rows(sorted_rows_ptr, chunk_start, chunk_end, N):
    """(head, tail) rows of a chunk: the row continuing into it from the previous chunk, and the row starting in
    it and continuing past its end; -1 where there is none. A chunk that is one row from end to end has a head
    only, so each crossing row has exactly one tail (in the chunk where it starts)."""
    first = tl.load(sorted_rows_ptr + chunk_start)
    last = tl.load(sorted_rows_ptr + chunk_end - 1)
    before = tl.load(sorted_rows_ptr + chunk_start - 1, mask=chunk_start > 0, other=-1)
    after = tl.load(sorted_rows_ptr + chunk_end, mask=chunk_end < N, other=-1)
    head = tl.where((first >= 0) & (before == first), first, -1)
    tail = tl.where((last >= 0) & (after == last) & (head != last), last, -1)
    return head, tail


@triton.jit
def _scatter_sorted_kernel(
    grad_out_ptr,  # [N, D] upstream gradient
    sorted_rows_ptr,  # [N] int32 compact rows, ascending; -1 (no row, or the padding row) sorts first
    order_ptr,  # [N] int64: token position of each sorted entry
    head_row_ptr,  # [C] int32 out: each chunk's head row (see _chunk_open_rows), for the fix-up kernel
    tail_row_ptr,  # [C] int32 out: each chunk's tail row
    partial_ptr,  # [C, 2, D] accumulation dtype out: the head's sum (slot 0) and the tail's (slot 1) in the chunk
    grad_weight_ptr,  # [U, D] output, zero-filled: rows no token uses stay 0
    N,  # number of ids
    D,  # embedding width
    TILES: tl.constexpr,  # tiles per chunk
    BLOCK_T: tl.constexpr,  # sorted tokens per tile
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    MMA: tl.constexpr = False,  # the segment sum as a 0/1-mask product on tensor cores (bf16/fp16 gradients only)
    DOT_FP32: tl.constexpr = False,  # that product in fp32: the interpreter's for bf16 (its bf16 dot is garbage)
):
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    chunk_start = i_c.to(tl.int64) * (TILES * BLOCK_T)
    chunk_end = tl.minimum(chunk_start + TILES * BLOCK_T, N)
    head, tail = _chunk_open_rows(sorted_rows_ptr, chunk_start, chunk_end, N)
    if i_d == 0:
        tl.store(head_row_ptr + i_c, head)
        tl.store(tail_row_ptr + i_c, tail)

    carry_row = tl.full([], -3, tl.int32)  # the row of the running sum carried from the previous tile
    b_carry = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for i_t in range(TILES):
        o_t = chunk_start + i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_t = o_t < chunk_end
        b_row = tl.load(sorted_rows_ptr + o_t, mask=m_t, other=2147483647)
        b_next = tl.load(sorted_rows_ptr + o_t + 1, mask=o_t + 1 < chunk_end, other=-2)
        b_tok = tl.load(order_ptr + o_t, mask=m_t, other=0)
        m_g = (m_t & (b_row >= 0))[:, None] & m_d[None, :]
        b_g = tl.load(grad_out_ptr + b_tok[:, None] * D + o_d[None, :], mask=m_g, other=0.0)
        b_sum = _segment_sums(b_row, b_g, BLOCK_T, BLOCK_D, ACC_DTYPE, MMA, DOT_FP32)
        if MMA:  # 0 x inf in the mask product would make other segments NaN: such a tile (an overflow) is redone.
            if tl.max(tl.where(tl.abs(b_sum) < float("inf"), 0, 1)) > 0:
                # Gathered again (rare): keeping the tile past the dot lost its vector loads (228 registers, 214 now).
                b_g = tl.load(grad_out_ptr + b_tok[:, None] * D + o_d[None, :], mask=m_g, other=0.0)
                b_sum = _nonfinite_segment_sums(b_row, b_g, DOT_FP32)
        b_sum += tl.where((b_row == carry_row)[:, None], b_carry[None, :], 0.0)

        # A segment ends where the next sorted row differs (or the chunk ends); its running sum is then complete
        # for this chunk. Heads and tails go to the partials; every other row is finished and written once.
        m_end = m_t & (b_row >= 0) & (b_row != b_next)
        m_head, m_tail = m_end & (b_row == head), m_end & (b_row == tail)
        m_own = m_end & (b_row != head) & (b_row != tail)
        p_own = grad_weight_ptr + b_row.to(tl.int64)[:, None] * D + o_d[None, :]
        tl.store(p_own, b_sum.to(grad_weight_ptr.dtype.element_ty), mask=m_own[:, None] & m_d[None, :])
        p_part = partial_ptr + (i_c.to(tl.int64) * 2) * D + o_d[None, :] + tl.zeros([BLOCK_T, 1], tl.int64)
        tl.store(p_part, b_sum, mask=m_head[:, None] & m_d[None, :])
        tl.store(p_part + D, b_sum, mask=m_tail[:, None] & m_d[None, :])

        i_last = tl.minimum(chunk_start + (i_t + 1) * BLOCK_T, chunk_end) - 1
        carry_row = tl.max(tl.where(m_t, b_row, -3), axis=0)
        b_carry = tl.sum(tl.where((o_t == i_last)[:, None], b_sum, 0.0), axis=0)


@triton.jit
def _scatter_sorted_fixup_kernel(
    head_row_ptr,  # [C] int32: each chunk's head row, -1 if none
    tail_row_ptr,  # [C] int32: each chunk's tail row, -1 if none
    partial_ptr,  # [C, 2, D] partial sums from _scatter_sorted_kernel
    grad_weight_ptr,  # [U, D] output: the rows crossing chunk boundaries are written here
    C,  # number of chunks
    D,  # embedding width
    BLOCK_K: tl.constexpr,  # chunks' partials summed per step
    BLOCK_D: tl.constexpr,
):
    # The program of the chunk where a crossing row starts sums that row's tail partial and then the head
    # partials of the following chunks, in chunk order: the same additions in the same order every run.
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    row = tl.load(tail_row_ptr + i_c)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = (o_d < D) & (tl.zeros([BLOCK_D], tl.int32) + row >= 0)  # a block mask: the interpreter wants one
    b_acc = tl.load(partial_ptr + (i_c.to(tl.int64) * 2 + 1) * D + o_d, mask=m_d, other=0.0)
    o_k = i_c.to(tl.int64) + 1 + tl.arange(0, BLOCK_K)
    more = row >= 0
    while more:
        # The chunks after the start whose head is this row are consecutive (rows are sorted).
        m_k = tl.load(head_row_ptr + o_k, mask=o_k < C, other=-1) == row
        b_part = tl.load(partial_ptr + (o_k * 2)[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :],
                         other=0.0)
        b_acc += tl.sum(b_part, axis=0)
        more = tl.sum(m_k.to(tl.int32), axis=0) == BLOCK_K
        o_k += BLOCK_K
    tl.store(grad_weight_ptr + row.to(tl.int64) * D + o_d, b_acc.to(grad_weight_ptr.dtype.element_ty), mask=m_d)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

# Tiles of the sorted backward (BLOCK_T, BLOCK_D, segment sum by MMA), by name. "32x128" ships (bf16 on sm_90: 216
# registers on Triton 3.6, 158 on 3.9: 2 or 3 programs of 4 warps per SM). The candidates, which the benchmark's
# `pema-sorted-<name>` times beside it so that one GPU run picks the default (bench/NOTES.md section 7): "16x128",
# the scan with more programs in flight (128 / 116 registers: 4 per SM), and "mma32x128", the segment sum as a
# [32, 32] 0/1 mask times the tile on tensor cores (bf16/fp16 only: an fp32 dot would round to TF32), whose gathers
# the compiler pipelines (cp.async; 225 / 214 registers, 2 per SM), a tile holding an inf or NaN redone so that it
# stays in its own row as in the reference (_nonfinite_segment_sums). 32 x 64 (139 on 3.9, 3 per SM) is not
# a candidate.
SORTED_TILES = {"32x128": (32, 128, False), "16x128": (16, 128, False), "mma32x128": (32, 128, True)}


def sorted_blocks(num_ids: int, dim: int, tile: str | None = None) -> dict[str, int | bool]:
    """Tile sizes of the sorted backward: BLOCK_T tokens x BLOCK_D columns per tile, TILES tiles per chunk.

    A 32 x 128 fp32 tile keeps the scan's keys and values at 64 registers a thread (4 warps). Chunks of 256
    tokens at large N make the partials' extra traffic 2 rows per 256 tokens read (under 1%); at small N,
    chunks of 64 keep enough programs to fill the device. `tile` (a SORTED_TILES name) keeps those chunk
    lengths with other tiles. Under the interpreter the default is small tiles that still exercise chunk
    crossings on test-sized inputs.
    """
    if tile is None and INTERPRET:
        return {"TILES": 2, "BLOCK_T": 64, "BLOCK_D": triton.next_power_of_2(dim), "BLOCK_K": 4, "MMA": False}
    if tile is not None and tile not in SORTED_TILES:
        raise ValueError(f"tile must be one of {sorted(SORTED_TILES)}, got {tile!r}")
    block_t, block_d, mma = SORTED_TILES[tile or "32x128"]
    chunk = 256 if num_ids >= 2**18 else 64
    block_d = max(min(triton.next_power_of_2(dim), block_d), 16 if mma else 1)  # a dot's operands: >= 16 wide
    return {"TILES": chunk // block_t, "BLOCK_T": block_t, "BLOCK_D": block_d, "BLOCK_K": 16, "MMA": mma}


@on_tensors_device
def lookup_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    remap: torch.Tensor,
    num_rows: int,
    padding_row: int = -1,
    method: str = "atomic",
    tile: str | None = None,
) -> torch.Tensor:
    """Triton backward of the compact lookup. Same contract as :func:`pema_triton.ops.reference.lookup_backward`.

    Args:
        grad_out: [*ids.shape, D] upstream gradient.
        ids: [*] original token ids; remap: [V] int32 compact row of each id, -1 for unused.
        num_rows: U; padding_row: a compact row that gets no gradient, or -1.
        method: "atomic" or "sorted" (module docstring); "sorted" is bit-identical run to run.
        tile: the sorted method's tile, a SORTED_TILES name (default: sorted_blocks'); the benchmark's variants.

    Returns:
        grad_weight: [U, D] in grad_out's dtype, accumulated in float32 (float64 for float64).
    """
    check_scatter_inputs(grad_out, ids, remap, num_rows)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tile is not None and method != "sorted":
        raise ValueError(f"tile= is the sorted method's, not {method!r}'s")
    if SORTED_TILES.get(tile, (0, 0, False))[2] and grad_out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"tile {tile!r} sums on tensor cores: bf16/fp16 gradients only (an fp32 dot rounds to "
                         f"TF32), got {grad_out.dtype}")
    dim = grad_out.shape[-1]
    flat_ids = ids.reshape(-1).contiguous()
    grad_2d = grad_out.reshape(-1, dim).contiguous()
    remap = remap.contiguous()
    acc_dtype = accumulation_dtype(grad_out.dtype)
    if method == "sorted":
        return _scatter_sorted(grad_2d, flat_ids, remap, num_rows, padding_row, acc_dtype, tile)
    return _scatter_atomic(grad_2d, flat_ids, remap, num_rows, padding_row, acc_dtype)


def _scatter_atomic(grad_2d, flat_ids, remap, num_rows, padding_row, acc_dtype) -> torch.Tensor:
    num_ids, dim = grad_2d.shape
    acc = torch.zeros(num_rows, dim, dtype=acc_dtype, device=grad_2d.device)
    if num_ids and dim:
        block_n, block_d = pick_blocks(dim, max_elements=4096)
        grid = (triton.cdiv(num_ids, block_n), triton.cdiv(dim, block_d))
        launchable(_scatter_atomic_kernel)[grid](
            grad_2d, flat_ids, remap, acc, num_ids, remap.numel(), dim, padding_row, BLOCK_N=block_n, BLOCK_D=block_d
        )
    return acc.to(grad_2d.dtype)


def _scatter_sorted(grad_2d, flat_ids, remap, num_rows, padding_row, acc_dtype, tile) -> torch.Tensor:
    num_ids, dim = grad_2d.shape
    blocks = sorted_blocks(num_ids, dim, tile)
    grad_weight = torch.zeros(num_rows, dim, dtype=grad_2d.dtype, device=grad_2d.device)
    if not (num_ids and dim):
        return grad_weight
    # Ids with no row and the padding row become -1: they sort first and no segment of theirs is written.
    rows = compact_rows(flat_ids, remap)
    if padding_row >= 0:
        rows = torch.where(rows == padding_row, -1, rows)
    sorted_rows, order = torch.sort(rows.to(torch.int32), stable=True)
    num_chunks = triton.cdiv(num_ids, blocks["TILES"] * blocks["BLOCK_T"])
    head_rows = torch.empty(num_chunks, dtype=torch.int32, device=grad_2d.device)
    tail_rows = torch.empty(num_chunks, dtype=torch.int32, device=grad_2d.device)
    partials = torch.empty(num_chunks, 2, dim, dtype=acc_dtype, device=grad_2d.device)
    grid = (num_chunks, triton.cdiv(dim, blocks["BLOCK_D"]))
    launchable(_scatter_sorted_kernel)[grid](
        grad_2d, sorted_rows, order, head_rows, tail_rows, partials, grad_weight, num_ids, dim,
        TILES=blocks["TILES"], BLOCK_T=blocks["BLOCK_T"], BLOCK_D=blocks["BLOCK_D"], ACC_DTYPE=_TL_ACC[acc_dtype],
        MMA=blocks["MMA"], DOT_FP32=INTERPRET and grad_2d.dtype == torch.bfloat16,
    )
    launchable(_scatter_sorted_fixup_kernel)[grid](
        head_rows, tail_rows, partials, grad_weight, num_chunks, dim, BLOCK_K=blocks["BLOCK_K"],
        BLOCK_D=blocks["BLOCK_D"],
    )
    return grad_weight
