"""pema_triton: Partial Embedding Matrix Adaptation with Triton kernels.

Train only the embedding rows your fine-tuning data uses: scan the data once, compact the embedding (and the
LM head) to the U used rows, fine-tune, merge the rows back.
"""

from .embedding import CompactEmbedding
from .errors import (
    AlreadyCompactedError,
    BackendError,
    CompactWeightError,
    IdOutOfRangeError,
    NoLogitsError,
    NotCompactedError,
    PemaDTypeError,
    PemaError,
    PemaWarning,
    SaveDirectoryError,
    ShardedModelError,
    TokenIdError,
    UnsupportedModuleError,
    UnusedIdError,
    UsedIdsError,
    VocabularySizeError,
)
from .handle import PemaHandle, get_handle
from .head import CompactLMHead
from .modes import OutputMode
from .ops import (
    HAS_TRITON,
    Compaction,
    build_remap,
    compact_embedding,
    compact_embedding_backward,
    resolve_backend,
    scan_ids,
)
from .optim import embedding_param_groups, embedding_parameters, set_embedding_lr
from .replace import replace_embeddings, restore_embeddings
from .sizing import estimate
from .trim import save_trimmed
from .vocab import VocabularyScan, scan_vocabulary, special_token_ids

__version__ = "0.2.0"

__all__ = [
    "AlreadyCompactedError",
    "BackendError",
    "CompactEmbedding",
    "CompactLMHead",
    "CompactWeightError",
    "Compaction",
    "HAS_TRITON",
    "IdOutOfRangeError",
    "NoLogitsError",
    "NotCompactedError",
    "OutputMode",
    "PemaDTypeError",
    "PemaError",
    "PemaHandle",
    "PemaWarning",
    "SaveDirectoryError",
    "ShardedModelError",
    "TokenIdError",
    "UnsupportedModuleError",
    "UnusedIdError",
    "UsedIdsError",
    "VocabularyScan",
    "VocabularySizeError",
    "build_remap",
    "compact_embedding",
    "compact_embedding_backward",
    "embedding_param_groups",
    "embedding_parameters",
    "estimate",
    "get_handle",
    "replace_embeddings",
    "resolve_backend",
    "restore_embeddings",
    "save_trimmed",
    "scan_ids",
    "scan_vocabulary",
    "set_embedding_lr",
    "special_token_ids",
]
