"""What every kernel here shares: the interpreter switch, tile sizes, and the jit helpers that read a program's
ids and map them to compact rows (the Triton side of `pema_triton.ops.remap.compact_rows`)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Triton decides interpreter-or-compiler when `@triton.jit` runs, i.e. when this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def on_tensors_device(launcher):
    """Runs `launcher` with its first tensor argument's CUDA device current.

    Triton launches on the *current* device, so a tensor on cuda:1 while cuda:0 is current (several GPUs in one
    process, e.g. `device_map="auto"`) would be read through the wrong context. Under `torch.compile` the guard is
    left out: the op's body is traced, and Inductor puts its own device guard around each kernel it emits.
    """

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda or torch.compiler.is_compiling():
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return guarded


def launchable(kernel):
    """`kernel` as torch.library.wrap_triton gives it (one node that torch.compile traces into its graph), or the
    kernel itself where this torch cannot wrap it: torch 2.11's wrap_triton refuses the interpreter's functions
    (TRITON_INTERPRET=1: `RuntimeError: wrap_triton only works on functions annotated with triton.jit`), 2.13's
    takes them. On a GPU every supported torch wraps it."""
    try:
        return wrap_triton(kernel)
    except RuntimeError:
        if not INTERPRET:
            raise
        return kernel


def pick_blocks(dim: int, max_elements: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) for kernels that move [tokens, D] tiles.

    BLOCK_D covers D up to 512 columns (a 1 KiB-2 KiB row segment per token); BLOCK_N fills the tile up to
    `max_elements` so each program keeps several rows in flight. Under the interpreter every program instance
    runs serially in numpy, so tiles are as large as memory allows to keep the instance count low.
    """
    if INTERPRET:
        block_d = triton.next_power_of_2(dim)
        return max(1, min(1024, 65536 // block_d)), block_d
    block_d = min(triton.next_power_of_2(dim), 512)
    return max(1, max_elements // block_d), block_d


@triton.jit
def load_ids(ids_ptr, N, V, BLOCK_N: tl.constexpr):
    """The BLOCK_N ids of this program (grid axis 0), as every kernel here reads them.

    Returns:
        o_n: [BLOCK_N] int64 token offsets (int64: N * D passes 2**31 for 1M tokens x 4096).
        m_n: [BLOCK_N] offsets below N.
        b_ids: [BLOCK_N] int64 ids (0 past N).
        m_in_vocab: [BLOCK_N] offsets below N whose id is in [0, V).
    """
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_ids = tl.load(ids_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    return o_n, m_n, b_ids, m_n & (b_ids >= 0) & (b_ids < V)


@triton.jit
def load_compact_rows(ids_ptr, remap_ptr, N, V, BLOCK_N: tl.constexpr):
    """The BLOCK_N ids of this program mapped to their compact rows, as lookup and scatter need.

    Returns:
        o_n, m_n: as :func:`load_ids`.
        b_rows: [BLOCK_N] int64 compact rows, -1 where an id is out of [0, V) or unused.
        m_row: [BLOCK_N] offsets below N whose id has a compact row.
    """
    o_n, m_n, b_ids, m_in_vocab = load_ids(ids_ptr, N, V, BLOCK_N)
    # Out-of-vocabulary ids are never dereferenced: the remap load is masked, so no read leaves [0, V).
    b_rows = tl.load(remap_ptr + b_ids, mask=m_in_vocab, other=-1).to(tl.int64)
    return o_n, m_n, b_rows, m_in_vocab & (b_rows >= 0)


@triton.jit
def count_into(counter_ptr, mask):
    """Adds the number of set lanes of `mask` to the [1] int32 counter: one atomic per program, none if zero.

    Relaxed: the default (acq_rel) fences every atomic, and only a later kernel or the host reads the counter.
    """
    num = tl.sum(mask.to(tl.int32), axis=0)
    if num > 0:
        tl.atomic_add(counter_ptr, num, sem="relaxed")
