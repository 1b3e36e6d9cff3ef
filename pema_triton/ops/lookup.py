"""The compact lookup `weight[remap[ids]]` and its [U, D] backward, as autograd-aware `torch.library` custom ops.

The lookup and its backward are custom ops (`triton_op` where Triton is installed), so `torch.compile` sees them as
single nodes with a known output shape, and autograd is registered on the op. Everything that reads a value back
to the host (the bad-id check) stays outside the ops.
"""

from __future__ import annotations

import torch

from ..errors import BackendError, PemaError
from .dispatch import HAS_TRITON, kernels_or_reference, uses_kernels
from .remap import check_remap_fits, raise_for_bad_ids

BACKWARD_METHODS = ("auto", "atomic", "sorted")

__all__ = [
    "BACKWARD_METHODS", "backward_method", "compact_embedding", "compact_embedding_backward",
    "compact_embedding_unchecked",
]


_custom_op = torch.library.triton_op if HAS_TRITON else torch.library.custom_op


@_custom_op("pema_triton::lookup", mutates_args=())
def _lookup_op(
    ids: torch.Tensor,
    remap: torch.Tensor,
    weight: torch.Tensor,
    padding_row: int,
    method: str,
    use_kernels: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # padding_row and method only matter to the backward; they are op inputs so autograd can see them.
    return kernels_or_reference(use_kernels).lookup(ids, remap, weight)


@_lookup_op.register_fake
def _(ids, remap, weight, padding_row, method, use_kernels):
    return weight.new_empty(*ids.shape, weight.shape[1]), weight.new_empty(1, dtype=torch.int32)


@_custom_op("pema_triton::lookup_backward", mutates_args=())
def _lookup_backward_op(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    remap: torch.Tensor,
    num_rows: int,
    padding_row: int,
    method: str,
    use_kernels: bool,
) -> torch.Tensor:
    if use_kernels:  # only the kernels have a choice of scatter; the reference has one exact method
        return kernels_or_reference(True).lookup_backward(grad_out, ids, remap, num_rows, padding_row, method)
    return kernels_or_reference(False).lookup_backward(grad_out, ids, remap, num_rows, padding_row)


@_lookup_backward_op.register_fake
def _(grad_out, ids, remap, num_rows, padding_row, method, use_kernels):
    return grad_out.new_empty(num_rows, grad_out.shape[-1])


def _setup_lookup_context(ctx, inputs, output):
    ids, remap, weight, padding_row, method, use_kernels = inputs
    ctx.save_for_backward(ids, remap)
    ctx.num_rows = weight.shape[0]
    ctx.padding_row, ctx.method, ctx.use_kernels = padding_row, method, use_kernels
    ctx.mark_non_differentiable(output[1])


def _lookup_backward(ctx, grad_out, _grad_num_bad):
    ids, remap = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[2]:
        grad_weight = _lookup_backward_op(
            grad_out, ids, remap, ctx.num_rows, ctx.padding_row, ctx.method, ctx.use_kernels
        )
    return None, None, grad_weight, None, None, None


_lookup_op.register_autograd(_lookup_backward, setup_context=_setup_lookup_context)


def backward_method(method: str, deterministic: bool | None, dtype: torch.dtype) -> str:
    """The scatter the backward runs: "atomic" or "sorted" (see :mod:`pema_triton.ops.kernels.lookup_backward`).

    "auto" chooses by the bytes each must move, for want of a GPU measurement (bench/NOTES.md): for bf16/fp16 the
    atomic scatter adds a [U, D] fp32 accumulator, its zero-fill and a cast (about 8 extra bytes an element, 0.98
    GB at U = 30k, D = 4096) where the sorted one writes [U, D] once in the output dtype, so sorted; for fp32 and
    fp64 the accumulator is the output and the sort is extra, so atomic. `deterministic` (None: follow
    `torch.are_deterministic_algorithms_enabled()`) forces sorted, the method that is bit-identical run to run.
    """
    if method not in BACKWARD_METHODS:
        raise BackendError(f"method must be one of {BACKWARD_METHODS}, got {method!r}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        if method == "atomic":
            raise BackendError('method="atomic" is not deterministic; use method="sorted" (or "auto")')
        return "sorted"
    if method == "auto":
        return "sorted" if dtype in (torch.float16, torch.bfloat16) else "atomic"
    return method


def compact_embedding(
    ids: torch.Tensor,
    remap: torch.Tensor,
    weight: torch.Tensor,
    *,
    padding_row: int = -1,
    backend: str = "auto",
    deterministic: bool | None = None,
    method: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """Embeds original token ids with a compact matrix: `weight[remap[ids]]`, differentiable in `weight`.

    Args:
        ids: [*] original vocabulary ids, int32 or int64. Never rewritten.
        remap: [V] int32, compact row of each used id, -1 for an unused one.
        weight: [U, D] compact matrix, float32 / float16 / bfloat16 / float64.
        padding_row: compact row that gets no gradient (`nn.Embedding`'s `padding_idx`), or -1.
        backend: "auto", "triton" or "torch" (see module docstring).
        deterministic: a backward bit-identical run to run; None follows
            `torch.are_deterministic_algorithms_enabled()`.
        method: the backward's scatter, "auto", "atomic" or "sorted" (see :func:`backward_method`).
        check_ids: raise on ids without a compact row, reading a [1] flag back to the host (one sync per call;
            :class:`~pema_triton.CompactEmbedding` checks without one). With False such ids embed to zeros.

    Returns:
        [*ids.shape, D] in weight's dtype.

    Raises:
        IdOutOfRangeError: an id outside [0, V).
        UnusedIdError: an id in [0, V) with no compact row.

    Examples:
        >>> used = torch.tensor([2, 5, 7]); remap = build_remap(used, vocab_size=10)
        >>> compact_embedding(torch.tensor([[5, 7, 2]]), remap, torch.randn(3, 4)).shape
        torch.Size([1, 3, 4])
    """
    _check_padding_row(padding_row, weight.shape[0] if weight.dim() == 2 else 0)
    check_remap_fits(remap, weight.shape[0] if weight.dim() == 2 else 0)
    out, num_bad = compact_embedding_unchecked(ids, remap, weight, padding_row=padding_row, backend=backend,
                                               deterministic=deterministic, method=method)
    if check_ids and num_bad.item():
        raise_for_bad_ids(ids, remap)
    return out


def _check_padding_row(padding_row: int, num_rows: int) -> None:
    if not -1 <= int(padding_row) < max(num_rows, 1):
        raise PemaError(f"padding_row must be -1 (none) or a row in [0, {num_rows}), got {padding_row}")


def compact_embedding_unchecked(
    ids: torch.Tensor, remap: torch.Tensor, weight: torch.Tensor, *, padding_row: int = -1, backend: str = "auto",
    deterministic: bool | None = None, method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compact_embedding` (same arguments but `check_ids`) that leaves the count of bad ids on the device.

    Returns:
        out: [*ids.shape, D], zero rows for ids with no compact row; num_bad: [1] int32 count of those ids.
    """
    use_kernels = uses_kernels(backend, weight.device)
    method = backward_method(method, deterministic, weight.dtype)
    return _lookup_op(ids, remap, weight, int(padding_row), method, use_kernels)


def compact_embedding_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    remap: torch.Tensor,
    num_rows: int,
    *,
    padding_row: int = -1,
    backend: str = "auto",
    deterministic: bool | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """The weight gradient of :func:`compact_embedding`, called directly (benchmarks, custom autograd).

    Args:
        grad_out: [*ids.shape, D]; ids, remap, deterministic, method: as in :func:`compact_embedding`;
            num_rows: U.

    Returns:
        [U, D] in grad_out's dtype, accumulated in float32. Nothing [V, D] is allocated.
    """
    num_rows, padding_row = int(num_rows), int(padding_row)
    _check_padding_row(padding_row, num_rows)
    check_remap_fits(remap, num_rows)
    use_kernels = uses_kernels(backend, grad_out.device)
    method = backward_method(method, deterministic, grad_out.dtype)
    return _lookup_backward_op(grad_out, ids, remap, int(num_rows), int(padding_row), method, use_kernels)


