"""pema_triton: Partial Embedding Matrix Adaptation with Triton kernels.

Train only the embedding rows your fine-tuning data uses: scan the data once, compact the embedding (and the
LM head) to the U used rows, fine-tune, merge the rows back.
"""

from .errors import (
    BackendError,
    IdOutOfRangeError,
    PemaDTypeError,
    PemaError,
    TokenIdError,
    UnsupportedModuleError,
    UnusedIdError,
    UsedIdsError,
)
from .modules import CompactEmbedding, CompactLMHead
from .ops import HAS_TRITON, compact_embedding, compact_embedding_backward, scan_ids
from .reference import build_remap
from .vocab import VocabularyScan

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CompactEmbedding",
    "CompactLMHead",
    "HAS_TRITON",
    "IdOutOfRangeError",
    "PemaDTypeError",
    "PemaError",
    "TokenIdError",
    "UnsupportedModuleError",
    "UnusedIdError",
    "UsedIdsError",
    "VocabularyScan",
    "build_remap",
    "compact_embedding",
    "compact_embedding_backward",
    "scan_ids",
]
