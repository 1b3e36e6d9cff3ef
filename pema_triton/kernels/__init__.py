"""Triton kernels and their launchers, one file per op. Nothing outside `pema_triton.ops` calls them.

Importing this package needs Triton. `TRITON_INTERPRET=1` must be set before it is imported for the kernels to
run on CPU tensors (Triton picks the interpreter when a kernel is decorated).
"""

from __future__ import annotations

import os

import triton

# Triton decides interpreter-or-compiler when `@triton.jit` runs, i.e. when this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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


__all__ = ["INTERPRET", "pick_blocks"]
