"""Triton kernels and their launchers, one file per op. Nothing outside `pema_triton.ops.dispatch` imports them.

Each launcher has the contract of the function of the same name in :mod:`pema_triton.ops.reference`, and returns the
count of bad ids rather than raising: reading it back to the host is the caller's choice.

Importing this package needs Triton. `TRITON_INTERPRET=1` must be set before it is imported for the kernels to
run on CPU tensors (Triton picks the interpreter when a kernel is decorated).
"""

from ._common import INTERPRET
from .cross_entropy_rows import cross_entropy_rows, log_prob_rows
from .lookup import lookup
from .lookup_backward import lookup_backward
from .scan import scan_ids, scan_ids_packed, used_ids_from_packed

__all__ = [
    "INTERPRET", "cross_entropy_rows", "log_prob_rows", "lookup", "lookup_backward", "scan_ids", "scan_ids_packed",
    "used_ids_from_packed",
]
