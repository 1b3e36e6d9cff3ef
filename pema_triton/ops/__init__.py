"""The functional layer: differentiable ops on original token ids, each with a Triton and a PyTorch implementation.

Public (`pema_triton.ops`): the lookup and its backward, the scan, the head's ops, the remap table and backend
choice. Inside: `dispatch` (Triton or reference), `reference` (the PyTorch oracle), `kernels/` (one Triton file per
op: lookup, lookup_backward, scan, linear_cross_entropy), `remap` (the id -> compact row rule), `_checks` (input
checks both implementations share). Nothing here imports from the rest of the package but `pema_triton.errors`.
"""

from .dispatch import BACKENDS, HAS_TRITON, resolve_backend
from .frozen_head_linear import frozen_head_linear
from .linear_cross_entropy import compact_linear_cross_entropy
from .linear_log_probs import compact_linear_log_probs
from .lookup import BACKWARD_METHODS, backward_method, compact_embedding, compact_embedding_backward
from .remap import Compaction, build_remap
from .scan import scan_ids

__all__ = [
    "BACKENDS", "BACKWARD_METHODS", "Compaction", "HAS_TRITON", "backward_method", "build_remap",
    "compact_embedding", "compact_embedding_backward", "compact_linear_cross_entropy", "compact_linear_log_probs",
    "frozen_head_linear",
    "resolve_backend", "scan_ids",
]
