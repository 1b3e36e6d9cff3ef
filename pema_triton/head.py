"""`CompactLMHead`: a drop-in `nn.Linear` subclass for the output embedding (LM head) whose U used rows train.

What happens to the other V - U rows, and which logits come out, is the head's output mode
(:mod:`pema_triton.modes`): "frozen" keeps them frozen and gives [..., V] logits, "restricted" drops them and
gives [..., U] logits. The head delegates everything mode-specific to its mode object.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ._compact_module import check_convertible, compact_class, compact_parameter, merge_rows, reduce_compact
from .errors import PemaError
from .guards import check_managed, mark_compacted
from .modes import OutputMode, head_mode
from .ops.remap import Compaction

__all__ = ["CompactLMHead"]

# Attributes _setup_compact adds to a converted module, removed again by uncompact_.
_COMPACT_ATTRS = ("output_mode", "num_embeddings", "expand_logits_in_forward")


class CompactLMHead(nn.Linear):
    """An output `nn.Linear` (LM head) whose used rows train and whose unused rows are frozen or dropped.

    Output modes:
        - "frozen" (default): logits [..., V] bit-identical to the original head's. The U used rows (and bias
          entries) are the trainable Parameter; the V-U unused rows stay frozen in a [V, D] buffer in the model's
          dtype (`frozen_weight`, whose used rows are refreshed from `weight` at each forward), with no gradient
          and no optimizer state. Nothing [V, D] is allocated for gradients.
        - "restricted": logits [..., U] over the used rows only, column i for id `used_ids[i]`; the unused
          rows are not kept. :meth:`expand_logits` gives [..., V] logits (unused columns at the dtype's lowest
          value) for code that needs V columns, such as generation; within :meth:`full_vocabulary_logits`
          forward returns those directly.

    Args:
        linear: the full head, weight [V, D], optional bias [V]; not modified.
        used_ids: [U] sorted unique ids in [0, V) (or a :class:`~pema_triton.ops.Compaction`).
        output: "frozen" or "restricted".
        weight: an existing [U, D] Parameter to use as the trainable rows, e.g. a tied model's
            `CompactEmbedding.weight` built from the same `used_ids`; None copies the used rows of `linear`.
        bias: likewise an existing [U] Parameter for the bias, or None to copy.

    Examples:
        >>> head = CompactLMHead(nn.Linear(64, 50_000, bias=False), torch.tensor([0, 17, 42]))
        >>> head(torch.randn(2, 64)).shape
        torch.Size([2, 50000])
    """

    def __init__(
        self,
        linear: nn.Linear,
        used_ids: torch.Tensor | Compaction,
        output: str = "frozen",
        *,
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a [V, D] weight
        compaction, mode = self._check_convertible(linear, used_ids, output)
        self._setup_compact(linear.weight, linear.bias, compaction, mode, weight, bias)

    @classmethod
    def convert_(
        cls,
        linear: nn.Linear,
        used_ids: torch.Tensor | Compaction,
        output: str | OutputMode = "frozen",
        *,
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
    ) -> CompactLMHead:
        """Compacts `linear` in place and returns it; its full weight and bias Parameters are left unmodified."""
        compaction, mode = cls._check_convertible(linear, used_ids, output)
        full_weight, full_bias = linear.weight, linear.bias
        linear.__class__ = compact_class(cls, type(linear))
        linear._setup_compact(full_weight, full_bias, compaction, mode, weight, bias)
        return linear

    def uncompact_(self, full_weight: nn.Parameter, full_bias: nn.Parameter | None, original_class: type) -> nn.Linear:
        """Undoes :meth:`convert_` (merge the trained rows first with :meth:`merge_into`)."""
        self.output_mode.teardown_head(self)
        self._buffers.pop("used_ids", None)
        for name in _COMPACT_ATTRS:
            self.__dict__.pop(name, None)
        self.weight, self.bias = full_weight, full_bias
        self.out_features = full_weight.shape[0]
        self.__class__ = original_class
        return self

    @staticmethod
    def _check_convertible(linear: nn.Module, used_ids, output) -> tuple[Compaction, OutputMode]:
        check_convertible(linear, CompactLMHead, nn.Linear)
        mode = head_mode(output)
        return Compaction.of(used_ids, linear.weight.shape[0]), mode

    def _setup_compact(self, full_weight, full_bias, compaction, mode, weight=None, bias=None):
        vocab_size, dim = full_weight.shape
        used = compaction.used_ids.to(full_weight.device)
        self.output_mode, self.num_embeddings, self.expand_logits_in_forward = mode, vocab_size, False
        self.in_features = dim
        self.out_features = mode.out_features(vocab_size, used.numel())
        self.weight = compact_parameter(full_weight, used, weight, "weight")
        self.bias = None if full_bias is None else compact_parameter(full_bias, used, bias, "bias")
        mark_compacted(self.weight, compaction.fingerprint)
        mark_compacted(self.bias, compaction.fingerprint)
        self.register_buffer("used_ids", used, persistent=False)
        mode.setup_head(self, full_weight, full_bias)

    @property
    def num_used(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[*, D] -> [*, V] logits (frozen) or [*, U] logits (restricted; [*, V] within full_vocabulary_logits)."""
        check_managed(self)
        return self.output_mode.head_forward(self, hidden)

    @contextmanager
    def full_vocabulary_logits(self):
        """Within the block, forward returns [*, V] logits whatever the mode (restricted: :meth:`expand_logits`)."""
        self.expand_logits_in_forward = True
        try:
            yield self
        finally:
            self.expand_logits_in_forward = False

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[*, U] restricted logits -> [*, V], unused columns at the dtype's lowest value (probability 0)."""
        if logits.shape[-1] != self.num_used:
            raise PemaError(f"expected logits with {self.num_used} columns (U), got shape {tuple(logits.shape)}")
        full = logits.new_full((*logits.shape[:-1], self.num_embeddings), torch.finfo(logits.dtype).min)
        return full.index_copy(-1, self.used_ids, logits)

    def refreshed_frozen_rows(self) -> torch.Tensor | None:
        """The mode's [V, D] frozen matrix with its used rows rewritten from `weight`: the matrix the head's forward
        multiplies by, for code that computes with the whole head (pema_triton.fused_lm_head). None where the mode
        keeps no frozen rows (`restricted`)."""
        frozen = self.output_mode.frozen_rows(self)
        if frozen is not None:
            with torch.no_grad():
                frozen.index_copy_(0, self.used_ids, self.weight.to(frozen.dtype))
        return frozen

    def merge_into(self, full_weight: torch.Tensor, full_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Writes the trained rows (and bias entries) into `full_weight` [V, D] / `full_bias` [V] in place."""
        merge_rows(full_weight, self.used_ids, self.weight, self.num_embeddings, "full_weight")
        if self.bias is not None:
            if full_bias is None:
                raise PemaError("this head has a bias: pass full_bias [V] to merge_into so its trained entries land")
            merge_rows(full_bias, self.used_ids, self.bias, self.num_embeddings, "full_bias")
        return full_weight

    __reduce_ex__ = reduce_compact  # torch.save(model) of a subclass compacted in place

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, num_used={self.num_used}, embedding_dim={self.in_features}, "
            f"output={self.output_mode.name}, bias={self.bias is not None}"
        )
