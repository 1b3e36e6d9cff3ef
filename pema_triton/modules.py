"""`CompactEmbedding` and `CompactLMHead`: drop-in `nn.Embedding` / `nn.Linear` subclasses that train only the U
used rows of a V-row matrix.

Both take *original* token ids / produce logits indexed by original ids (or, for a `restricted` head, by
position in `used_ids`), so nothing in the data or tokenizer changes. They are built from a full module either
as a new module (`CompactEmbedding(embedding, used_ids)`) or in place (`CompactEmbedding.convert_(embedding,
used_ids)`, which keeps the module object, its hooks and any extra behaviour of an embedding subclass; this is
what :func:`pema_triton.replace_embeddings` uses). Neither path ever allocates a [V, D] parameter or gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_used_ids, raise_for_bad_ids
from .errors import PemaError, UnsupportedModuleError
from .ops import compact_embedding, use_triton
from .reference import build_remap

__all__ = ["CompactEmbedding", "CompactLMHead", "HEAD_MODES"]

HEAD_MODES = ("frozen", "restricted")

# Compact attributes added by _setup_compact, removed again by uncompact_.
_EMBEDDING_ATTRS = ("backend", "deterministic", "check_ids", "_padding_row")
_HEAD_ATTRS = ("mode", "num_embeddings", "expand_output")


def _copy_rows(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A detached copy of `matrix[rows]`, so the compact module never aliases the original storage."""
    return matrix.detach().index_select(0, rows.to(matrix.device)).clone()


_COMPACT_CLASSES: dict[tuple[type, type], type] = {}


def _compact_class(compact: type, original: type) -> type:
    """The class a module of class `original` becomes when compacted in place.

    For a subclass of nn.Embedding / nn.Linear (e.g. Gemma's or BART's scaled word embedding, whose forward is
    `super().forward(ids) * embed_scale`) this is `Compact<Original>(Original, compact)`: its MRO puts the compact
    forward where the subclass's `super()` looks, so the subclass's extra behaviour is kept.
    """
    if original in (nn.Embedding, nn.Linear):
        return compact
    key = (compact, original)
    if key not in _COMPACT_CLASSES:
        _COMPACT_CLASSES[key] = type(f"Compact{original.__name__}", (original, compact), {"__module__": __name__})
    return _COMPACT_CLASSES[key]


def _check_shared(weight: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    if tuple(weight.shape) != shape or weight.dtype != dtype:
        raise PemaError(f"shared {what} must be {list(shape)} {dtype} (the used rows), got {list(weight.shape)} {weight.dtype}")


class CompactEmbedding(nn.Embedding):
    """An `nn.Embedding` that holds and trains only the rows of `used_ids`.

    Forward takes original ids and maps them through a [V] remap table fused into the gather (Triton on GPU),
    so `CompactEmbedding(emb, used)(ids) == emb(ids)` for every `ids` drawn from `used`, and the gradient is
    [U, D]: the used rows of the full one, with `padding_idx`'s row getting none, as in `nn.Embedding`.
    `num_embeddings` stays V (the ids it accepts); `weight` is [U, D].

    Args:
        embedding: the full `nn.Embedding` (or a subclass); not modified.
        used_ids: [U] sorted unique ids in [0, V) to keep.
        backend: "auto", "triton" or "torch" (see :mod:`pema_triton.ops`).
        deterministic: backward without atomics; None follows `torch.are_deterministic_algorithms_enabled()`.
        check_ids: raise on ids outside the used set (one device-to-host flag read per forward).
        weight: an existing [U, D] Parameter to train (shared between modules of one tied matrix), or None to
            copy the used rows.

    Attributes:
        weight: [U, D] trainable Parameter, a copy of the used rows.
        used_ids: [U] int64 buffer; remap: [V] int32 buffer (-1 for unused ids). Both non-persistent.

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
        weight: nn.Parameter | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it would allocate a [V, D] weight
        used = self._check_convertible(embedding, used_ids, backend)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self._setup_compact(embedding.weight, used, backend, deterministic, check_ids, weight)

    @classmethod
    def convert_(
        cls,
        embedding: nn.Embedding,
        used_ids: torch.Tensor,
        *,
        backend: str = "auto",
        deterministic: bool | None = None,
        check_ids: bool = True,
        weight: nn.Parameter | None = None,
        remap: torch.Tensor | None = None,
    ) -> CompactEmbedding:
        """Compacts `embedding` in place and returns it (same object, class now a CompactEmbedding).

        Its full weight Parameter is detached from the module, not modified: keep it to :meth:`uncompact_`.
        `remap` lets several modules of one tied matrix share one [V] table.
        """
        used = cls._check_convertible(embedding, used_ids, backend)
        full_weight = embedding.weight
        embedding.__class__ = _compact_class(cls, type(embedding))
        embedding._setup_compact(full_weight, used, backend, deterministic, check_ids, weight, remap)
        return embedding

    def uncompact_(self, full_weight: nn.Parameter, original_class: type) -> nn.Embedding:
        """Undoes :meth:`convert_`: puts `full_weight` back as the weight and the original class back.

        Merge the trained rows first (:meth:`merge_into`); this method only restores the module's structure.
        """
        for name in ("used_ids", "remap"):
            del self._buffers[name]
        for name in _EMBEDDING_ATTRS:
            delattr(self, name)
        self.__dict__.pop("unused_rows", None)
        self.weight = full_weight
        self.__class__ = original_class
        return self

    @staticmethod
    def _check_convertible(embedding: nn.Module, used_ids, backend: str) -> torch.Tensor:
        if isinstance(embedding, CompactEmbedding):
            raise PemaError(f"{type(embedding).__name__} is already compact")
        if not isinstance(embedding, nn.Embedding):
            raise UnsupportedModuleError(f"CompactEmbedding needs an nn.Embedding, got {type(embedding).__name__}")
        for option, off in (("max_norm", None), ("sparse", False), ("scale_grad_by_freq", False)):
            if getattr(embedding, option) != off:
                raise UnsupportedModuleError(
                    f"nn.Embedding({option}={getattr(embedding, option)!r}) is not supported by CompactEmbedding; "
                    f"build the embedding without it"
                )
        use_triton(backend, embedding.weight.device)  # reject a backend that cannot run before changing anything
        return check_used_ids(used_ids, embedding.weight.shape[0], embedding.weight.device)

    def _setup_compact(self, full_weight, used, backend, deterministic, check_ids, weight=None, remap=None):
        self.backend, self.deterministic, self.check_ids = backend, deterministic, check_ids
        if weight is None:
            weight = nn.Parameter(_copy_rows(full_weight, used), requires_grad=full_weight.requires_grad)
        _check_shared(weight, (used.numel(), full_weight.shape[1]), full_weight.dtype, "weight")
        self.weight = weight
        self.register_buffer("used_ids", used, persistent=False)
        self.register_buffer("remap", build_remap(used, full_weight.shape[0]) if remap is None else remap,
                             persistent=False)
        # Looked up once here: reading remap[padding_idx] in forward is a device-to-host sync every step.
        self._padding_row = -1 if self.padding_idx is None else int(self.remap[self.padding_idx])

    @property
    def num_used(self) -> int:
        return self.weight.shape[0]

    @property
    def padding_row(self) -> int:
        """Compact row of `padding_idx`, or -1 where there is none (or the pad id is not used)."""
        return self._padding_row

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[*] original ids -> [*, D]."""
        fallback = getattr(self, "unused_rows", None)
        out = compact_embedding(
            ids,
            self.remap,
            self.weight,
            padding_row=self.padding_row,
            backend=self.backend,
            deterministic=self.deterministic,
            check_ids=self.check_ids and fallback is None,
        )
        if fallback is not None:
            out = self._fill_unused(ids, out, fallback)
        return out

    def _fill_unused(self, ids: torch.Tensor, out: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Embeds ids outside the used set with their frozen rows from `fallback` [V, D] (any device).

        Set by `replace_embeddings` during `generate()`: a model with full-vocabulary logits may emit an id the
        data never used, and embedding it with its unchanged row is what full fine-tuning with the unused rows
        frozen would do. Ids outside [0, V) still raise.
        """
        flat = ids.reshape(-1).long()
        if bool(((flat < 0) | (flat >= self.num_embeddings)).any()):
            raise_for_bad_ids(ids, self.remap)
        unused = self.remap[flat] < 0
        if not bool(unused.any()):
            return out
        rows = fallback[flat[unused].to(fallback.device)].to(device=out.device, dtype=out.dtype)
        out = out.reshape(-1, out.shape[-1]).clone()
        out[unused] = rows
        return out.view(*ids.shape, -1)

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


class CompactLMHead(nn.Linear):
    """An output `nn.Linear` (LM head) whose used rows train and whose unused rows are frozen or dropped.

    Modes:
        - "frozen" (default): logits [..., V] bit-identical to the original head's. The U used rows (and bias
          entries) are the trainable Parameter; the V-U unused rows stay frozen in a [V, D] buffer in the model's
          dtype (`full_weight`, whose used rows are refreshed from `weight` at each forward), with no gradient and
          no optimizer state. Nothing [V, D] is allocated for gradients.
        - "restricted": logits [..., U] over the used rows only, column i for id `used_ids[i]`; the unused
          rows are not kept. :meth:`expand_logits` gives [..., V] logits (unused columns at the dtype's lowest
          value) for code that needs V columns, such as generation; with `expand_output = True` forward returns
          those directly.

    Args:
        linear: the full head, weight [V, D], optional bias [V]; not modified.
        used_ids: [U] sorted unique ids in [0, V).
        mode: "frozen" or "restricted".
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
        used_ids: torch.Tensor,
        mode: str = "frozen",
        *,
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a [V, D] weight
        used = self._check_convertible(linear, used_ids, mode)
        self._setup_compact(linear.weight, linear.bias, used, mode, weight, bias)

    @classmethod
    def convert_(
        cls,
        linear: nn.Linear,
        used_ids: torch.Tensor,
        mode: str = "frozen",
        *,
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
    ) -> CompactLMHead:
        """Compacts `linear` in place and returns it; its full weight and bias Parameters are left unmodified."""
        used = cls._check_convertible(linear, used_ids, mode)
        full_weight, full_bias = linear.weight, linear.bias
        linear.__class__ = _compact_class(cls, type(linear))
        linear._setup_compact(full_weight, full_bias, used, mode, weight, bias)
        return linear

    def uncompact_(self, full_weight: nn.Parameter, full_bias: nn.Parameter | None, original_class: type) -> nn.Linear:
        """Undoes :meth:`convert_` (merge the trained rows first with :meth:`merge_into`)."""
        for name in ("used_ids", "full_weight", "full_bias"):
            self._buffers.pop(name, None)
        for name in _HEAD_ATTRS:
            delattr(self, name)
        self.weight, self.bias = full_weight, full_bias
        self.out_features = full_weight.shape[0]
        self.__class__ = original_class
        return self

    @staticmethod
    def _check_convertible(linear: nn.Module, used_ids, mode: str) -> torch.Tensor:
        if isinstance(linear, CompactLMHead):
            raise PemaError(f"{type(linear).__name__} is already compact")
        if not isinstance(linear, nn.Linear):
            raise UnsupportedModuleError(f"CompactLMHead needs an nn.Linear, got {type(linear).__name__}")
        if mode not in HEAD_MODES:
            raise PemaError(f"mode must be one of {HEAD_MODES}, got {mode!r}")
        return check_used_ids(used_ids, linear.weight.shape[0], linear.weight.device)

    def _setup_compact(self, full_weight, full_bias, used, mode, weight=None, bias=None):
        vocab_size, dim = full_weight.shape
        self.mode, self.num_embeddings, self.expand_output = mode, vocab_size, False
        self.in_features = dim
        self.out_features = vocab_size if mode == "frozen" else used.numel()
        if weight is None:
            weight = nn.Parameter(_copy_rows(full_weight, used), requires_grad=full_weight.requires_grad)
        _check_shared(weight, (used.numel(), dim), full_weight.dtype, "weight")
        self.weight = weight
        if full_bias is not None and bias is None:
            bias = nn.Parameter(_copy_rows(full_bias, used), requires_grad=full_bias.requires_grad)
        if full_bias is not None:
            _check_shared(bias, (used.numel(),), full_bias.dtype, "bias")
        self.bias = bias if full_bias is not None else None
        self.register_buffer("used_ids", used, persistent=False)
        if mode == "frozen":
            # The whole [V, D] matrix as a buffer: its unused rows are the frozen ones, and its U used rows are
            # overwritten from `weight` at every forward, so the logits come from the very GEMM the original head
            # runs and match it bit for bit (two GEMMs over the used / unused rows differ by 1 ulp on CPU).
            # Costs U x D more memory than a (V-U)-row buffer; no gradient or optimizer state is ever [V, D].
            self.register_buffer("full_weight", full_weight.detach().clone(), persistent=False)
            full_bias_copy = full_bias.detach().clone() if full_bias is not None else None
            self.register_buffer("full_bias", full_bias_copy, persistent=False)

    @property
    def num_used(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[*, D] -> [*, V] logits (frozen) or [*, U] logits (restricted; [*, V] with `expand_output`)."""
        if self.mode == "restricted":
            logits = F.linear(hidden, self.weight, self.bias)
            return self.expand_logits(logits) if self.expand_output else logits
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
        _check_full(full_weight, (self.num_embeddings, self.in_features), "full_weight")
        full_weight.index_copy_(0, self.used_ids.to(full_weight.device), self.weight.to(full_weight))
        if self.bias is not None:
            if full_bias is None:
                raise PemaError("this head has a bias: pass full_bias [V] to merge_into so its trained entries land")
            _check_full(full_bias, (self.num_embeddings,), "full_bias")
            full_bias.index_copy_(0, self.used_ids.to(full_bias.device), self.bias.to(full_bias))
        return full_weight

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, num_used={self.num_used}, embedding_dim={self.in_features}, "
            f"mode={self.mode}, bias={self.bias is not None}"
        )


class _FrozenHeadLinear(torch.autograd.Function):
    """`F.linear(hidden, full_weight, full_bias)` after writing the trainable rows into the full buffers.

    Backward returns [U, D] / [U] gradients for the trainable rows only: never a [V, D] gradient. Under autocast
    the forward's `F.linear` runs in the autocast dtype, so backward casts its operands to `grad_logits`' dtype,
    as the cast nodes of a plain `nn.Linear` would; autograd casts the results back to the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, full_weight, full_bias, used_ids):
        with torch.no_grad():
            full_weight.index_copy_(0, used_ids, weight)
            if bias is not None:
                full_bias.index_copy_(0, used_ids, bias)
        # The trainable `weight` is what autograd version-checks, as for nn.Linear: an in-place update between
        # forward and backward raises. The buffer is held on ctx, not saved: a second forward before backward
        # (chosen and rejected passes, a head called twice) rewrites it with the same rows, which is no error.
        ctx.save_for_backward(hidden, weight, used_ids)
        ctx.full_weight = full_weight
        ctx.has_bias = bias is not None
        return F.linear(hidden, full_weight, full_bias)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, _, used_ids = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_logits.matmul(ctx.full_weight.to(grad_logits.dtype))
        grad_used = grad_logits.index_select(-1, used_ids).reshape(-1, used_ids.numel())  # [B*T, U]
        if ctx.needs_input_grad[1]:
            grad_weight = grad_used.t().matmul(hidden.reshape(-1, hidden.shape[-1]).to(grad_logits.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_used.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _check_full(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape) != shape:
        raise PemaError(f"{name} must have shape {shape} (the full vocabulary), got {tuple(tensor.shape)}")
