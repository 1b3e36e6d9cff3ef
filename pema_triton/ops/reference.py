"""Pure-PyTorch versions of every op: the lookup, its backward, the scan and the fused head + cross-entropy.

They are the CPU path for users without a GPU and the oracle every Triton kernel is tested against, so they
favour clarity over speed; each mirrors its kernel's contract exactly (shapes, dtypes, what counts as a bad id).
Nothing outside tests and `pema_triton.ops.dispatch` imports this module: production helpers live in `remap` and
`_checks`.

Notation: V the original vocabulary size, U the number of used ids (rows of the compact matrix), D the
embedding width, N the number of token ids in a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    accumulation_dtype,
    check_linear_cross_entropy_inputs,
    check_lookup_inputs,
    check_scan_state,
    check_scatter_inputs,
)
from .remap import compact_rows

__all__ = ["linear_cross_entropy", "linear_cross_entropy_backward", "lookup", "lookup_backward", "scan_ids"]


def _all_in_vocabulary(flat: torch.Tensor, vocab_size: int) -> bool:
    """Whether every id is in [0, vocab_size): one pass, one host read.

    False while torch.compile traces (the ops' bodies must not branch on data): callers then take their
    branch-free masked path, which gives the same result.
    """
    if torch.compiler.is_compiling():
        return False
    low, high = torch.aminmax(flat)
    return bool(low >= 0) and bool(high < vocab_size)


def lookup(ids: torch.Tensor, remap: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`out[..., :] = weight[remap[ids[...]], :]`.

    Args:
        ids: [*] original token ids, int32 or int64.
        remap: [V] int32, the compact row of each used id and -1 for an unused one.
        weight: [U, D] the compact matrix.

    Returns:
        out: [*ids.shape, D] in weight's dtype; zero where an id has no compact row.
        num_bad: [1] int32, how many ids had no compact row (outside [0, V) or unused).
    """
    check_lookup_inputs(ids, remap, weight)
    flat = ids.reshape(-1)
    if flat.numel() and _all_in_vocabulary(flat, remap.numel()):
        # Common case: every id is inside the vocabulary, so the table needs no masking and the rows go straight
        # to F.embedding's gather, skipping the masked path's extra [N, D] pass.
        rows = remap[flat].long()
        num_bad = (rows < 0).sum().to(torch.int32).reshape(1)
        if not num_bad.item():
            return F.embedding(rows, weight).view(*ids.shape, weight.shape[1]), num_bad
    rows = compact_rows(ids, remap)
    has_row = rows >= 0
    out = weight.index_select(0, rows.clamp(min=0))
    out = torch.where(has_row[:, None], out, out.new_zeros(()))
    num_bad = (~has_row).sum().to(torch.int32).reshape(1)
    return out.view(*ids.shape, weight.shape[1]), num_bad


def lookup_backward(
    grad_out: torch.Tensor, ids: torch.Tensor, remap: torch.Tensor, num_rows: int, padding_row: int = -1
) -> torch.Tensor:
    """Gradient of :func:`lookup` with respect to `weight`: every occurrence of a row summed.

    Args:
        grad_out: [*ids.shape, D] upstream gradient.
        ids, remap: as in :func:`lookup`.
        num_rows: U, rows of the compact matrix.
        padding_row: a compact row that gets no gradient (`nn.Embedding`'s `padding_idx`), or -1.

    Returns:
        grad_weight: [U, D] in grad_out's dtype, accumulated in float32 (float64 for float64).
    """
    check_scatter_inputs(grad_out, ids, remap, num_rows)
    dim = grad_out.shape[-1]
    grad = grad_out.reshape(-1, dim)
    # Ids with no row and the padding row add into one extra row, dropped at the end: no masked copy of the
    # [N, D] gradient (it made this 0.68x the full-vocabulary backward at V = 30k, N = 16k on the CPU).
    rows = compact_rows(ids, remap).reshape(-1)
    rows = torch.where((rows >= 0) & (rows != padding_row), rows, num_rows)
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64):
        # The CPU's dense embedding backward: threads own ranges of rows and each sums its rows in id order
        # (deterministic, no atomics), here over U + 1 rows; the extra row is its padding_idx, so it gets nothing.
        return torch.ops.aten.embedding_dense_backward(grad, rows, num_rows + 1, num_rows, False)[:num_rows]
    acc = torch.zeros(num_rows + 1, dim, dtype=accumulation_dtype(grad_out.dtype), device=grad_out.device)
    acc.index_add_(0, rows, grad.to(acc.dtype))
    return acc[:num_rows].to(grad_out.dtype)


def scan_ids(
    ids: torch.Tensor,
    byte_map: torch.Tensor,
    counts: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Marks in `byte_map` every id of `ids`; adds their occurrences to `counts`. Streams: call per chunk.

    Args:
        ids: [*] token ids, int32 or int64.
        byte_map: [V] uint8, set to 1 at each id seen (in place).
        counts: [V] int64 occurrence counts, incremented in place, or None.
        ignore_index: an id to skip silently (e.g. -100, the ignored label), or None.

    Returns:
        num_bad: [1] int32, how many ids (other than `ignore_index`) were outside [0, V); they are not marked.
    """
    check_scan_state(ids, byte_map, counts)
    flat = ids.reshape(-1).long()
    vocab_size = byte_map.numel()
    if ignore_index is not None and 0 <= ignore_index < vocab_size:
        flat = flat[flat != ignore_index]  # an ignored id inside the vocabulary is skipped too, not marked
    if flat.numel() and _all_in_vocabulary(flat, vocab_size):
        # Common case: one bincount instead of a masked scatter into the map (and a second pass for counts).
        seen = torch.bincount(flat, minlength=vocab_size)
        byte_map |= (seen > 0).to(torch.uint8)
        if counts is not None:
            counts += seen
        return torch.zeros(1, dtype=torch.int32, device=ids.device)
    valid = (flat >= 0) & (flat < vocab_size)
    skipped = flat == ignore_index if ignore_index is not None else torch.zeros_like(valid)
    seen = flat[valid]
    byte_map[seen] = 1
    if counts is not None:
        counts += torch.bincount(seen, minlength=vocab_size).to(counts.dtype)
    return (~valid & ~skipped).sum().to(torch.int32).reshape(1)


# Chunk sizes of the fused head + loss: a [tokens, vocabulary] fp32 logit block of at most 1024 x 2048 = 8 MiB,
# whatever N and V are (the unfused head holds all N x V: 1024 tokens x 49,152 ids is already 192 MiB), worked on
# in place so that one such block is alive at a time. Smaller blocks cost time (Python steps, smaller GEMMs).
_TOKEN_CHUNK, _VOCAB_CHUNK = 1024, 2048


def _head_rows(weight, frozen_weight, remap, start, stop, dtype):
    """[stop - start, D] rows of the head rounded to `dtype` and held in its accumulation dtype: trainable rows
    from the compact `weight` through `remap`, the others from `frozen_weight`. One vocabulary chunk at a time,
    never the [V, D] matrix. Products of the rounded values summed in fp32 are what the kernels compute."""
    rows = remap[start:stop].long()
    trainable = rows >= 0
    # torch.where, not a masked assignment: shapes that do not depend on the ids, so torch.compile traces it.
    chunk = torch.where(trainable[:, None], weight[rows.clamp(min=0)], frozen_weight[start:stop]).to(dtype)
    return chunk.to(accumulation_dtype(dtype)), rows, trainable


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    frozen_weight: torch.Tensor,
    remap: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of the head's logits over all V rows, without the [N, V] logits.

    Args:
        hidden: [N, D]. weight: [U, D] trainable rows. frozen_weight: [V, D], read where `remap` is -1.
        remap: [V] int32 compact row of each id, -1 for a frozen one. targets: [N] ids in [0, V) or `ignore_index`.
        compute_dtype: the dtype of the logit GEMM's inputs (the autocast dtype under autocast); accumulation fp32.

    Returns:
        loss: [N] fp32 (fp64 for fp64), `logsumexp(logits) - logits[target]`, 0 where ignored. lse: [N] likewise.
    """
    check_linear_cross_entropy_inputs(hidden, weight, frozen_weight, remap, targets)
    dtype = compute_dtype or hidden.dtype
    acc = accumulation_dtype(dtype)
    vocab_size, num_tokens = remap.numel(), hidden.shape[0]
    lse = torch.empty(num_tokens, dtype=acc, device=hidden.device)
    target_logit = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
    for n0 in range(0, num_tokens, _TOKEN_CHUNK):
        h = hidden[n0 : n0 + _TOKEN_CHUNK].to(dtype).to(acc)
        t = targets[n0 : n0 + _TOKEN_CHUNK]
        parts = []
        for v0 in range(0, vocab_size, _VOCAB_CHUNK):
            w, _, _ = _head_rows(weight, frozen_weight, remap, v0, v0 + _VOCAB_CHUNK, dtype)
            logits = h @ w.t()
            inside = (t >= v0) & (t < v0 + w.shape[0])
            picked = logits.gather(1, (t - v0).clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            target_logit[n0 : n0 + _TOKEN_CHUNK] += torch.where(inside, picked, 0.0)
            top = logits.amax(dim=1)  # log-sum-exp in place: one [tokens, vocabulary] block alive
            parts.append(top + logits.sub_(top[:, None]).exp_().sum(dim=1).log_())
        lse[n0 : n0 + _TOKEN_CHUNK] = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
    loss = torch.where(targets != ignore_index, lse - target_logit, 0.0)
    return loss, lse


def linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    frozen_weight: torch.Tensor,
    remap: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `sum(grad_loss * loss)` for :func:`linear_cross_entropy`, logits recomputed by chunks.

    Args:
        grad_loss: [N] weight of each token's loss (0 where ignored). lse: [N] from the forward.

    Returns:
        grad_hidden: [N, D] (over all V rows), grad_weight: [U, D] (the trainable rows only), both accumulated in
        fp32 (fp64 for fp64).
    """
    check_linear_cross_entropy_inputs(hidden, weight, frozen_weight, remap, targets)
    dtype = compute_dtype or hidden.dtype
    acc = accumulation_dtype(dtype)
    vocab_size, num_tokens = remap.numel(), hidden.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=hidden.device)
    for n0 in range(0, num_tokens, _TOKEN_CHUNK):
        chunk = slice(n0, n0 + _TOKEN_CHUNK)
        h, t, g = hidden[chunk].to(dtype).to(acc), targets[chunk], grad_loss[chunk]
        for v0 in range(0, vocab_size, _VOCAB_CHUNK):
            w, rows, trainable = _head_rows(weight, frozen_weight, remap, v0, v0 + _VOCAB_CHUNK, dtype)
            grad_logits = (h @ w.t()).sub_(lse[chunk, None]).exp_()  # the softmax, in place
            inside = (t >= v0) & (t < v0 + w.shape[0])
            # Minus the one-hot target (x + -0.0 is x elsewhere), with shapes that do not depend on the ids.
            grad_logits.scatter_add_(1, (t - v0).clamp(0, w.shape[0] - 1)[:, None], -inside.to(acc)[:, None])
            grad_logits.mul_(g[:, None])
            # Rounded to the compute dtype for the two GEMMs, as autograd's gradient of a half-precision head is.
            grad_logits = grad_logits.to(dtype).to(acc)
            grad_hidden[chunk].addmm_(grad_logits, w)
            if torch.compiler.is_compiling():  # every column, the frozen ones zeroed into row 0: static shapes
                grad_weight.index_add_(0, rows.clamp(min=0), (grad_logits * trainable).t() @ h)
            else:  # only the trainable columns: (V - U) / V less of this GEMM
                grad_weight.index_add_(0, rows[trainable], grad_logits[:, trainable].t() @ h)
    return grad_hidden, grad_weight
