"""`CompactEmbedding`: a drop-in `nn.Embedding` subclass that holds and trains only the U used rows of a V-row
matrix, and takes *original* token ids, so nothing in the data or tokenizer changes.

Built either as a new module (`CompactEmbedding(embedding, used_ids)`) or in place (`CompactEmbedding.convert_`,
which keeps the module object, its hooks and any extra behaviour of an embedding subclass; this is what
:func:`pema_triton.replace_embeddings` uses). Neither path ever allocates a [V, D] parameter or gradient.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ._compact_module import check_convertible, compact_class, compact_parameter, merge_rows, reduce_compact
from .errors import UnsupportedModuleError
from .guards import check_managed, mark_compacted
from .id_check import BadIdWatch, check_ids_option
from .ops.dispatch import resolve_backend
from .ops.lookup import compact_embedding_unchecked
from .ops.remap import Compaction, compact_rows, raise_for_bad_ids, raise_for_out_of_range

__all__ = ["CompactEmbedding"]

# nn.Embedding options copied as they are; the last three must be off (checked in _check_convertible).
_EMBEDDING_OPTIONS = ("num_embeddings", "embedding_dim", "padding_idx", "norm_type", "max_norm", "scale_grad_by_freq",
                      "sparse")
_UNSUPPORTED_OPTIONS = (("max_norm", None), ("sparse", False), ("scale_grad_by_freq", False))
# Attributes _setup_compact adds to a converted module, removed again by uncompact_.
_COMPACT_ATTRS = ("backend", "deterministic", "check_ids", "padding_row", "unused_rows", "bad_id_watch")


class CompactEmbedding(nn.Embedding):
    """An `nn.Embedding` that holds and trains only the rows of `used_ids`.

    Forward takes original ids and maps them through a [V] remap table fused into the gather (Triton on GPU),
    so `CompactEmbedding(emb, used)(ids) == emb(ids)` for every `ids` drawn from `used`, and the gradient is
    [U, D]: the used rows of the full one, with `padding_idx`'s row getting none, as in `nn.Embedding`.
    `num_embeddings` stays V (the ids it accepts); `weight` is [U, D].

    Args:
        embedding: the full `nn.Embedding` (or a subclass); not modified.
        used_ids: [U] sorted unique ids in [0, V) to keep (or a :class:`~pema_triton.ops.Compaction`).
        backend: "auto", "triton" or "torch" (see :mod:`pema_triton.ops`).
        deterministic: backward without atomics; None follows `torch.are_deterministic_algorithms_enabled()`.
        check_ids: raise on ids outside the used set: True (default) without a host sync on CUDA, raising at a
            later forward or at :meth:`check_bad_ids` (see :mod:`pema_triton.id_check`); "sync" in the forward
            that sees them; False never.
        weight: an existing [U, D] Parameter to train (shared between modules of one tied matrix), or None to
            copy the used rows.

    Attributes:
        weight: [U, D] trainable Parameter, a copy of the used rows.
        used_ids: [U] int64 buffer; remap: [V] int32 buffer (-1 for unused ids); bad_id_count: [1] int32
            buffer, ids with no compact row seen and not yet reported. All non-persistent.
        padding_row: compact row of `padding_idx`, or -1 where there is none (or the pad id is not used).
        unused_rows: None, or (while :meth:`embedding_unused_ids` is active, or set for a run) the [V, D] matrix
            whose rows embed ids outside the used set, or a function returning it.
        lookup_remap: None, or (with `replace_embeddings(trainable_ids=)`) a [V] int32 buffer, the remap of the
            ids `unused_rows` may embed: the used ids; others are refused.

    Raises:
        UsedIdsError: bad `used_ids`. UnsupportedModuleError: `max_norm`, `sparse` or `scale_grad_by_freq` set.

    Examples:
        >>> emb = nn.Embedding(50_000, 64)
        >>> compact = CompactEmbedding(emb, torch.tensor([0, 17, 42]))
        >>> compact(torch.tensor([[42, 0]])).shape
        torch.Size([1, 2, 64])
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        used_ids: torch.Tensor | Compaction,
        *,
        backend: str = "auto",
        deterministic: bool | None = None,
        check_ids: bool = True,
        weight: nn.Parameter | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it would allocate a [V, D] weight
        compaction = self._check_convertible(embedding, used_ids, backend)
        for name in _EMBEDDING_OPTIONS:
            setattr(self, name, getattr(embedding, name))
        self._setup_compact(embedding.weight, compaction, backend=backend, deterministic=deterministic,
                            check_ids=check_ids, weight=weight)

    @classmethod
    def convert_(
        cls, embedding: nn.Embedding, used_ids: torch.Tensor | Compaction, *, remap: torch.Tensor | None = None,
        **options,
    ) -> CompactEmbedding:
        """Compacts `embedding` in place and returns it (same object, class now a CompactEmbedding).

        `options` are the constructor's keywords (`backend`, `deterministic`, `check_ids`, `weight`); `remap`
        lets several modules of one tied matrix share one [V] table. The full weight Parameter is detached from
        the module, not modified: keep it to :meth:`uncompact_`.
        """
        compaction = cls._check_convertible(embedding, used_ids, options.get("backend", "auto"))
        full_weight = embedding.weight
        embedding.__class__ = compact_class(cls, type(embedding))
        embedding._setup_compact(full_weight, compaction, remap=remap, **options)
        return embedding

    def uncompact_(self, full_weight: nn.Parameter, original_class: type) -> nn.Embedding:
        """Undoes :meth:`convert_`: puts `full_weight` back as the weight and the original class back.

        Merge the trained rows first (:meth:`merge_into`); this method only restores the module's structure.
        """
        for name in ("used_ids", "remap", "bad_id_count", "lookup_remap"):
            self._buffers.pop(name, None)
        for name in _COMPACT_ATTRS:
            self.__dict__.pop(name, None)
        self.weight = full_weight
        self.__class__ = original_class
        return self

    @staticmethod
    def _check_convertible(embedding: nn.Module, used_ids, backend: str) -> Compaction:
        check_convertible(embedding, CompactEmbedding, nn.Embedding)
        for option, off in _UNSUPPORTED_OPTIONS:
            if getattr(embedding, option) != off:
                raise UnsupportedModuleError(
                    f"nn.Embedding({option}={getattr(embedding, option)!r}) is not supported by CompactEmbedding; "
                    f"build the embedding without it"
                )
        resolve_backend(backend, embedding.weight.device)  # reject a backend that cannot run before changing anything
        return Compaction.of(used_ids, embedding.weight.shape[0])

    def _setup_compact(self, full_weight, compaction, *, backend="auto", deterministic=None, check_ids=True,
                       weight=None, remap=None):
        used = compaction.used_ids.to(full_weight.device)
        self.backend, self.deterministic, self.check_ids = backend, deterministic, check_ids_option(check_ids)
        self.weight = compact_parameter(full_weight, used, weight, "weight")
        mark_compacted(self.weight, compaction.fingerprint)
        self.register_buffer("used_ids", used, persistent=False)
        self.register_buffer("remap", compaction.remap(full_weight.device) if remap is None else remap,
                             persistent=False)
        self.register_buffer("bad_id_count", torch.zeros(1, dtype=torch.int32, device=full_weight.device),
                             persistent=False)
        self.bad_id_watch = BadIdWatch()
        # Looked up once here, from the CPU ids: reading remap[padding_idx] in forward is a device-to-host sync every
        # step, and a meta-device remap (pema_triton.estimate) holds no values.
        self.padding_row = -1 if self.padding_idx is None else compaction.row_of(self.padding_idx)
        self.unused_rows = None
        self.register_buffer("lookup_remap", None, persistent=False)

    @property
    def num_used(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[*] original ids -> [*, D]."""
        check_managed(self)
        out, num_bad = compact_embedding_unchecked(
            ids, self.remap, self.weight, padding_row=self.padding_row, backend=self.backend,
            deterministic=self.deterministic,
        )
        if self.unused_rows is not None:  # a [V, D] tensor, or what reads it at each call (the handle's rows)
            rows = self.unused_rows if isinstance(self.unused_rows, torch.Tensor) else self.unused_rows()
            return self._embed_unused(ids, out, rows)
        if self.check_ids:
            self.bad_id_watch.observe(ids, num_bad, self.bad_id_count, self.remap, self.check_ids)
        return out

    def check_bad_ids(self) -> None:
        """Waits for the forwards still being counted; raises `UnusedIdError` / `IdOutOfRangeError` if any looked up
        an id this module holds no row for. A host sync: call it where training syncs anyway (logging, saving)."""
        if self.check_ids:
            self.bad_id_watch.check(self.bad_id_count, self.remap)

    @contextmanager
    def embedding_unused_ids(self, unused_rows: torch.Tensor):
        """Within the block, ids outside the used set embed to their (frozen) rows of `unused_rows` [V, D].

        For generation with full-vocabulary logits, which may pick an id the data never used: full fine-tuning
        with the unused rows frozen embeds it with its unchanged row. Ids outside [0, V) still raise.
        """
        previous = self.unused_rows, self.lookup_remap
        self.unused_rows, self.lookup_remap = unused_rows, None
        try:
            yield self
        finally:
            # None, or what is set for the whole run (compact_trainer's embed_unscanned, trainable_ids)
            self.unused_rows, self.lookup_remap = previous

    def _embed_unused(self, ids: torch.Tensor, out: torch.Tensor, unused_rows: torch.Tensor) -> torch.Tensor:
        if self.lookup_remap is None:
            raise_for_out_of_range(ids, self.num_embeddings)
        else:  # trainable_ids: the frozen rows embed the used ids only; any other id is refused as without them
            raise_for_bad_ids(ids, self.lookup_remap.to(ids.device))
        flat = ids.reshape(-1).long()
        unused = compact_rows(flat, self.remap) < 0
        if not bool(unused.any()):
            return out
        rows = unused_rows[flat[unused].to(unused_rows.device)].to(device=out.device, dtype=out.dtype)
        out = out.reshape(-1, out.shape[-1]).clone()
        out[unused] = rows
        return out.view(*ids.shape, -1)

    def merge_into(self, full_weight: torch.Tensor) -> torch.Tensor:
        """Writes the trained rows into `full_weight` [V, D] in place (other rows untouched); returns it."""
        return merge_rows(full_weight, self.used_ids, self.weight, self.num_embeddings, "full_weight")

    __reduce_ex__ = reduce_compact  # torch.save(model) of a subclass compacted in place

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, num_used={self.num_used}, embedding_dim={self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
