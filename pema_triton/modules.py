"""`CompactEmbedding` and `CompactLMHead`: drop-in modules that train only the U used rows of a V-row matrix.

Both take *original* token ids / produce logits indexed by original ids (or, for a `restricted` head, by
position in `used_ids`), so nothing in the data or tokenizer changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_used_ids
from .errors import PemaError, UnsupportedModuleError
from .ops import compact_embedding, use_triton
from .reference import build_remap

__all__ = ["CompactEmbedding", "CompactLMHead", "HEAD_MODES"]

HEAD_MODES = ("frozen", "restricted")


def _copy_rows(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A detached copy of `matrix[rows]`, so the compact module never aliases the original storage."""
    return matrix.detach().index_select(0, rows.to(matrix.device)).clone()


class CompactEmbedding(nn.Module):
    """An `nn.Embedding` that holds and trains only the rows of `used_ids`.

    Forward takes original ids and maps them through a [V] remap table fused into the gather (Triton on GPU),
    so `CompactEmbedding(emb, used)(ids) == emb(ids)` for every `ids` drawn from `used`, and the gradient is
    [U, D]: the used rows of the full one, with `padding_idx`'s row getting none, as in `nn.Embedding`.

    Args:
        embedding: the full `nn.Embedding` (or a subclass); not modified.
        used_ids: [U] sorted unique ids in [0, V) to keep.
        backend: "auto", "triton" or "torch" (see :mod:`pema_triton.ops`).
        deterministic: backward without atomics; None follows `torch.are_deterministic_algorithms_enabled()`.
        check_ids: raise on ids outside the used set (one device-to-host flag read per forward).

    Attributes:
        weight: [U, D] trainable Parameter, a copy of the used rows.
        used_ids: [U] int64 buffer; remap: [V] int32 buffer (-1 for unused ids).

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
        used_ids: torch.Tensor,
        *,
        backend: str = "auto",
        deterministic: bool | None = None,
        check_ids: bool = True,
    ):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise UnsupportedModuleError(f"CompactEmbedding needs an nn.Embedding, got {type(embedding).__name__}")
        for option, off in (("max_norm", None), ("sparse", False), ("scale_grad_by_freq", False)):
            if getattr(embedding, option) != off:
                raise UnsupportedModuleError(
                    f"nn.Embedding({option}={getattr(embedding, option)!r}) is not supported by CompactEmbedding; "
                    f"build the embedding without it"
                )
        use_triton(backend, embedding.weight.device)  # reject a backend that cannot run before building anything
        vocab_size, dim = embedding.weight.shape
        used = check_used_ids(used_ids, vocab_size, embedding.weight.device)

        self.num_embeddings, self.embedding_dim = vocab_size, dim
        self.padding_idx = embedding.padding_idx
        self.backend, self.deterministic, self.check_ids = backend, deterministic, check_ids
        self.weight = nn.Parameter(_copy_rows(embedding.weight, used), requires_grad=embedding.weight.requires_grad)
        self.register_buffer("used_ids", used)
        self.register_buffer("remap", build_remap(used, vocab_size))

    @property
    def num_used(self) -> int:
        return self.weight.shape[0]

    @property
    def padding_row(self) -> int:
        """Compact row of `padding_idx`, or -1 where there is none (or the pad id is not used)."""
        if self.padding_idx is None:
            return -1
        return int(self.remap[self.padding_idx])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[*] original ids -> [*, D]."""
        return compact_embedding(
            ids,
            self.remap,
            self.weight,
            padding_row=self.padding_row,
            backend=self.backend,
            deterministic=self.deterministic,
            check_ids=self.check_ids,
        )

    @torch.no_grad()
    def merge_into(self, full_weight: torch.Tensor) -> torch.Tensor:
        """Writes the trained rows into `full_weight` [V, D] in place (other rows untouched); returns it."""
        _check_full(full_weight, (self.num_embeddings, self.embedding_dim), "full_weight")
        full_weight.index_copy_(0, self.used_ids.to(full_weight.device), self.weight.to(full_weight))
        return full_weight

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, num_used={self.num_used}, embedding_dim={self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


class CompactLMHead(nn.Module):
    """An output `nn.Linear` (LM head) whose used rows train and whose unused rows are frozen or dropped.

    Modes:
        - "frozen" (default): logits [..., V] bit-identical to the original head's. The U used rows (and bias
          entries) are the trainable Parameter; the V-U unused rows stay frozen in a [V, D] buffer in the model's
          dtype (`full_weight`, whose used rows are refreshed from `weight` at each forward), with no gradient and
          no optimizer state. Nothing [V, D] is allocated for gradients.
        - "restricted": logits [..., U] over the used rows only, column i for id `used_ids[i]`; the unused
          rows are not kept. :meth:`expand_logits` gives [..., V] logits (unused columns at the dtype's lowest
          value) for code that needs V columns, such as generation.

    Args:
        linear: the full head, weight [V, D], optional bias [V]; not modified.
        used_ids: [U] sorted unique ids in [0, V).
        mode: "frozen" or "restricted".
        weight: an existing [U, D] Parameter to use as the trainable rows, e.g. a tied model's
            `CompactEmbedding.weight` built from the same `used_ids`; None copies the used rows of `linear`.

    Examples:
        >>> head = CompactLMHead(nn.Linear(64, 50_000, bias=False), torch.tensor([0, 17, 42]))
        >>> head(torch.randn(2, 64)).shape
        torch.Size([2, 50000])
    """

    def __init__(
        self,
        linear: nn.Linear,
        used_ids: torch.Tensor,
        mode: str = "frozen",
        *,
        weight: nn.Parameter | None = None,
    ):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise UnsupportedModuleError(f"CompactLMHead needs an nn.Linear, got {type(linear).__name__}")
        if mode not in HEAD_MODES:
            raise PemaError(f"mode must be one of {HEAD_MODES}, got {mode!r}")
        vocab_size, dim = linear.weight.shape
        used = check_used_ids(used_ids, vocab_size, linear.weight.device)
        if weight is not None:
            expected = (used.numel(), dim)
            if tuple(weight.shape) != expected or weight.dtype != linear.weight.dtype:
                raise PemaError(
                    f"shared weight must be [{expected[0]}, {expected[1]}] {linear.weight.dtype} (the used rows of "
                    f"the head), got {tuple(weight.shape)} {weight.dtype}"
                )
        else:
            weight = nn.Parameter(_copy_rows(linear.weight, used), requires_grad=linear.weight.requires_grad)

        self.num_embeddings, self.embedding_dim, self.mode = vocab_size, dim, mode
        self.weight = weight
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(_copy_rows(linear.bias, used), requires_grad=linear.bias.requires_grad)
        self.register_buffer("used_ids", used)
        if mode == "frozen":
            # The whole [V, D] matrix as a buffer: its unused rows are the frozen ones, and its U used rows are
            # overwritten from `weight` at every forward, so the logits come from the very GEMM the original head
            # runs and match it bit for bit (two GEMMs over the used / unused rows differ by 1 ulp on CPU).
            # Costs U x D more memory than a (V-U)-row buffer; no gradient or optimizer state is ever [V, D].
            self.register_buffer("full_weight", linear.weight.detach().clone())
            self.register_buffer("full_bias", linear.bias.detach().clone() if linear.bias is not None else None)

    @property
    def num_used(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        """Columns of the logits this head returns: V when frozen, U when restricted."""
        return self.num_embeddings if self.mode == "frozen" else self.num_used

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[*, D] -> [*, V] logits (frozen) or [*, U] logits (restricted)."""
        if self.mode == "restricted":
            return F.linear(hidden, self.weight, self.bias)
        return _FrozenHeadLinear.apply(hidden, self.weight, self.bias, self.full_weight, self.full_bias, self.used_ids)

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[*, U] restricted logits -> [*, V], unused columns at the dtype's lowest value (probability 0)."""
        if logits.shape[-1] != self.num_used:
            raise PemaError(f"expected logits with {self.num_used} columns (U), got shape {tuple(logits.shape)}")
        full = logits.new_full((*logits.shape[:-1], self.num_embeddings), torch.finfo(logits.dtype).min)
        return full.index_copy(-1, self.used_ids, logits)

    @torch.no_grad()
    def merge_into(self, full_weight: torch.Tensor, full_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Writes the trained rows (and bias entries) into `full_weight` [V, D] / `full_bias` [V] in place."""
        _check_full(full_weight, (self.num_embeddings, self.embedding_dim), "full_weight")
        full_weight.index_copy_(0, self.used_ids.to(full_weight.device), self.weight.to(full_weight))
        if self.bias is not None:
            if full_bias is None:
                raise PemaError("this head has a bias: pass full_bias [V] to merge_into so its trained entries land")
            _check_full(full_bias, (self.num_embeddings,), "full_bias")
            full_bias.index_copy_(0, self.used_ids.to(full_bias.device), self.bias.to(full_bias))
        return full_weight

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, num_used={self.num_used}, embedding_dim={self.embedding_dim}, "
            f"mode={self.mode}, bias={self.bias is not None}"
        )


class _FrozenHeadLinear(torch.autograd.Function):
    """`F.linear(hidden, full_weight, full_bias)` after writing the trainable rows into the full buffers.

    Backward returns [U, D] / [U] gradients for the trainable rows only: never a [V, D] gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, full_weight, full_bias, used_ids):
        with torch.no_grad():
            full_weight.index_copy_(0, used_ids, weight)
            if bias is not None:
                full_bias.index_copy_(0, used_ids, bias)
        ctx.save_for_backward(hidden, full_weight, used_ids)
        ctx.has_bias = bias is not None
        return F.linear(hidden, full_weight, full_bias)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, full_weight, used_ids = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_logits.matmul(full_weight)
        grad_used = grad_logits.index_select(-1, used_ids).reshape(-1, used_ids.numel())  # [B*T, U]
        if ctx.needs_input_grad[1]:
            grad_weight = grad_used.t().matmul(hidden.reshape(-1, hidden.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_used.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _check_full(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape) != shape:
        raise PemaError(f"{name} must have shape {shape} (the full vocabulary), got {tuple(tensor.shape)}")
