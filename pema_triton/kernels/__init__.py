"""Triton kernels and their launchers, one file per op. Nothing outside `pema_triton.ops` calls them.

Each launcher has the contract of the function of the same name in :mod:`pema_triton.reference`, and returns the
count of bad ids rather than raising: reading it back to the host is the caller's choice.

Importing this package needs Triton. `TRITON_INTERPRET=1` must be set before it is imported for the kernels to
run on CPU tensors (Triton picks the interpreter when a kernel is decorated).
"""

from ._common import INTERPRET
from .linear_ce import linear_cross_entropy, linear_cross_entropy_backward
from .lookup import lookup
from .scan import mark_ids, mark_ids_packed, used_ids_from_packed
from .scatter import lookup_backward

__all__ = [
    "INTERPRET", "linear_cross_entropy", "linear_cross_entropy_backward", "lookup", "lookup_backward", "mark_ids",
    "mark_ids_packed", "used_ids_from_packed",
]
