"""Pure-PyTorch versions of every op: the lookup, its backward, the scan and the fused heads' row passes.

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
from torch._subclasses.fake_tensor import is_fake

from ._checks import (
    LogProbRows,
    accumulation_dtype,
    check_lookup_inputs,
    check_scan_state,
    check_scatter_inputs,
)
from .remap import compact_rows

__all__ = ["cross_entropy_rows", "log_prob_rows", "lookup", "lookup_backward", "scan_ids"]


def _all_in_vocabulary(flat: torch.Tensor, vocab_size: int) -> bool:
    """Whether every id is in [0, vocab_size): one pass, one host read.

    False while torch.compile traces (the ops' bodies must not branch on data): callers then take their
    branch-free masked path, which gives the same result. Dynamo's flag is not enough: AOTAutograd traces the ops'
    bodies with fake tensors outside Dynamo (torch 2.11 runs this then, and a host read raises
    GuardOnDataDependentSymNode).
    """
    if torch.compiler.is_compiling() or is_fake(flat):
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


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = -100,
    write_grad: bool = True,
) -> torch.Tensor:
    """The fused loss's row pass over one chunk of logits: each token's loss and, in place, its logit gradient.

    Args:
        logits: [n, V'] contiguous, in the dtype of the GEMM that made them; where `write_grad`, overwritten with
            `(softmax(logits) - onehot(targets)) * scale[:, None]` in that dtype (what the two gradient GEMMs read).
        targets: [n] int64 columns; a target outside [0, V') scores no logit (its loss is the log-sum-exp).
        scale: [n] fp32 weight of each token's loss in the total (1 / denominator, 0 where ignored).
        ignore_index: the target whose loss is 0.

    Returns:
        loss: [n] fp32 (fp64 for fp64) `logsumexp(logits) - logits[target]`, 0 where the target is `ignore_index`.
    """
    acc = accumulation_dtype(logits.dtype)
    z = logits.to(acc)  # a half chunk is upcast once (as F.cross_entropy's .float() on the unfused logits)
    width = z.shape[1]
    inside = (targets >= 0) & (targets < width)
    column = targets.clamp(0, max(width - 1, 0))[:, None]
    target_logit = torch.where(inside, z.gather(1, column).squeeze(1), 0.0)
    if not write_grad:  # the logits stay untouched
        lse = torch.logsumexp(z, dim=1)
    else:  # z becomes the gradient in place: softmax, minus the one-hot target (x + -0.0 is x elsewhere), scaled
        row_max, total, _ = _exp_shifted_(z)
        lse = row_max + total.log()
        scale = scale.to(acc)
        z.mul_((scale / total)[:, None]).scatter_add_(1, column, -(inside * scale)[:, None])
        if logits.dtype != acc:  # else z is logits itself
            logits.copy_(z)
    return torch.where(targets != ignore_index, lse - target_logit, 0.0)


def _exp_shifted_(z: torch.Tensor, entropy: bool = False):
    """`z` [n, V'] -> in place `exp(z - max)`; returns the row max [n], `sum exp(z - max)` [n] and, where
    `entropy`, `sum exp(z - max) (z - max)` [n] (else None).

    In place, without `torch.logsumexp`: on 2 CPU threads at [512, 49152] fp32 logsumexp took 61 ms, the max, shift,
    exp_ and sum 25; an exp into a new [n, V'] tensor 54 ms against 12 in place (a fresh 100 MB is page-faulted in
    every time), so the entropy's product runs over row blocks of ~4 MB, whose temporaries the allocator reuses.
    """
    row_max = z.amax(1)
    z.sub_(row_max[:, None])
    if not entropy:
        z.exp_()
        return row_max, z.sum(1), None
    shifted = z.new_empty(z.shape[0])
    block = max(1, 2**20 // max(z.shape[1], 1))
    for start in range(0, z.shape[0], block):
        rows = z[start:start + block]
        exp = rows.exp()
        shifted[start:start + block] = torch.linalg.vecdot(exp, rows)
        rows.copy_(exp)
    return row_max, z.sum(1), shifted


def log_prob_rows(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, entropy: bool = False,
    top1: bool = False, write_grad: bool = False,
) -> LogProbRows:
    """The fused log-probs' row pass over one chunk of logits: each token's statistics of `z = logits / T` and
    the gradient of its log-prob's negative w.r.t. the logits.

    Args:
        logits: [n, V'] contiguous, in the dtype of the GEMM that made them; fp32 / fp64 logits are overwritten.
        targets: [n] int64 columns in [0, V').
        entropy, top1: also return `-sum p log p` and the column of the first maximum (ties: the lowest column).
        write_grad: also return `(softmax(z) - onehot(targets)) / T` [n, V'] in the logits' dtype (R's GEMM reads
            it): in `logits` for fp32 / fp64, as the kernel writes it for every dtype.

    Returns:
        LogProbRows(log_probs = z[target] - lse, lse = logsumexp(z), entropy, argmax, grad; None where not asked).
    """
    z = logits.to(accumulation_dtype(logits.dtype))  # a half chunk is upcast once
    if temperature != 1.0:
        z = z.mul_(1 / temperature)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    argmax = z.argmax(1) if top1 else None  # the first maximum, before any rounding of the shift
    ent = grad = None
    if not (entropy or write_grad):
        lse = torch.logsumexp(z, dim=1)
    else:  # z becomes exp(z - max) in place, then the gradient
        row_max, total, shifted = _exp_shifted_(z, entropy)
        log_total = total.log()
        lse = row_max + log_total
        if entropy:  # -sum p log p = log S - sum e s / S, from terms near 0 (no lse - E[z] cancellation)
            ent = log_total - shifted / total
        if write_grad:
            grad = z.mul_((1 / total)[:, None]).scatter_add_(1, targets[:, None], z.new_full((len(targets), 1), -1.0))
            grad = (grad if temperature == 1.0 else grad.mul_(1 / temperature)).to(logits.dtype)
    return LogProbRows(target_logit - lse, lse, ent, argmax, grad)
