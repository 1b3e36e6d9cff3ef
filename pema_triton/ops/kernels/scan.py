"""Vocabulary scan: mark each id of a batch in a [V] byte map, optionally counting occurrences.

Layout: one uint8 per id rather than packed bits. A byte map is written with plain stores (every writer stores
1, so concurrent writes to one byte cannot lose an update); a packed map needs an atomic OR per token, since ids
sharing a 32-bit word would overwrite each other. At V = 1,000,000 the byte map is 1 MB, small enough to stay in
an H100's 50 MB L2. `scan_ids_packed` is the packed-bit layout, kept for the benchmark that compares the two
(docs/design.md); the library does not use it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import PemaDTypeError
from .._checks import check_id_dtype, check_scan_state
from ._common import INTERPRET, count_into, launchable, load_ids, on_tensors_device

# Ids a program: 4096 ids of 4-8 bytes stream 16-32 KiB of input each. The interpreter runs programs one at a
# time, so it gets few large ones.
_SCAN_BLOCK = 65536 if INTERPRET else 4096


@triton.jit
def _scan_kernel(
    ids_ptr,  # [N] token ids, int32 or int64
    byte_map_ptr,  # [V] uint8, set to 1 at each id seen
    counts_ptr,  # [V] int64 occurrence counts (unused unless HAS_COUNTS)
    num_bad_ptr,  # [1] int32: incremented by the number of ids outside [0, V) (other than IGNORE_INDEX)
    N,  # number of ids
    V,  # vocabulary size
    ignore_index,  # id skipped silently (only if HAS_IGNORE)
    HAS_COUNTS: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, m_n, b_ids, m_valid = load_ids(ids_ptr, N, V, BLOCK)
    m_bad = m_n & ~m_valid
    if HAS_IGNORE:
        m_bad = m_bad & (b_ids != ignore_index)
        m_valid = m_valid & (b_ids != ignore_index)  # skipped even where it is a real id (e.g. a pad label)
    count_into(num_bad_ptr, m_bad)
    # Test before set: real text repeats a few ids in most positions, and stores of one byte from many lanes hit
    # one memory sector; a read of an already-set byte skips the store.
    b_seen = tl.load(byte_map_ptr + b_ids, mask=m_valid, other=1)
    tl.store(byte_map_ptr + b_ids, tl.full([BLOCK], 1, tl.uint8), mask=m_valid & (b_seen == 0))
    if HAS_COUNTS:  # relaxed: only a later kernel or the host reads the counts
        tl.atomic_add(counts_ptr + b_ids, tl.full([BLOCK], 1, tl.int64), mask=m_valid, sem="relaxed")


@on_tensors_device
def scan_ids(ids: torch.Tensor, byte_map: torch.Tensor, counts: torch.Tensor | None = None,
             ignore_index: int | None = None) -> torch.Tensor:
    """Triton vocabulary scan, with the contract of :func:`pema_triton.ops.reference.scan_ids`: marks `ids` [*] in
    `byte_map` [V] uint8 (and counts them into `counts` [V] int64); returns the [1] int32 count of ids outside
    [0, V) other than `ignore_index`."""
    check_scan_state(ids, byte_map, counts)
    flat_ids = ids.reshape(-1).contiguous()
    num_ids = flat_ids.numel()
    num_bad = torch.zeros(1, dtype=torch.int32, device=ids.device)
    if num_ids:
        launchable(_scan_kernel)[(triton.cdiv(num_ids, _SCAN_BLOCK),)](
            flat_ids,
            byte_map,
            counts if counts is not None else byte_map,
            num_bad,
            num_ids,
            byte_map.numel(),
            ignore_index if ignore_index is not None else 0,
            HAS_COUNTS=counts is not None,
            HAS_IGNORE=ignore_index is not None,
            BLOCK=_SCAN_BLOCK,
        )
    return num_bad


@triton.jit
def _scan_packed_kernel(
    ids_ptr,  # [N] token ids, int32 or int64
    words_ptr,  # [ceil(V / 32)] int32: bit (id % 32) of word (id // 32) set for each id seen
    num_bad_ptr,  # [1] int32: incremented by the number of ids outside [0, V)
    N,  # number of ids
    V,  # vocabulary size
    BLOCK: tl.constexpr,
):
    _, m_n, b_ids, m_valid = load_ids(ids_ptr, N, V, BLOCK)
    count_into(num_bad_ptr, m_n & ~m_valid)
    # Bit 31 wraps to the int32 sign bit, which is what the OR needs.
    b_bits = (tl.full([BLOCK], 1, tl.int64) << (b_ids & 31)).to(tl.int32)
    tl.atomic_or(words_ptr + (b_ids >> 5), b_bits, mask=m_valid, sem="relaxed")


@on_tensors_device
def scan_ids_packed(ids: torch.Tensor, words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed-bit scan (the layout not chosen; for the benchmark). Marks `ids` [*] in `words` [ceil(V / 32)] int32.

    Returns:
        num_bad: [1] int32 count of ids outside [0, V).
    """
    check_id_dtype(ids)
    if words.dtype != torch.int32 or words.shape != ((vocab_size + 31) // 32,) or words.device != ids.device:
        raise PemaDTypeError(f"words must be a [ceil(V / 32)] int32 tensor on {ids.device}, got {words.dtype} "
                             f"{tuple(words.shape)} on {words.device}")
    flat_ids = ids.reshape(-1).contiguous()
    num_bad = torch.zeros(1, dtype=torch.int32, device=ids.device)
    if flat_ids.numel():
        _scan_packed_kernel[(triton.cdiv(flat_ids.numel(), _SCAN_BLOCK),)](
            flat_ids, words, num_bad, flat_ids.numel(), vocab_size, BLOCK=_SCAN_BLOCK
        )
    return num_bad


def used_ids_from_packed(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[ceil(V / 32)] int32 packed map -> [U] sorted int64 ids whose bit is set."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words[:, None] >> shifts) & 1  # [W, 32]: bit j of word w is id 32 w + j
    return torch.nonzero(bits.reshape(-1)[:vocab_size]).flatten()
