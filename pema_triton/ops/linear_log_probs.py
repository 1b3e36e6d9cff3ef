"""Per-token log-probabilities (and entropy, top-1, ...) of `hidden @ head.T` for a head whose used rows train:
what TRL's fused LM head returns, computed by chunks of tokens, so the [N, V] logits never exist, and with a
[U, D] head gradient (a frozen head's other rows get none).

Each chunk's logits come from one GEMM against the whole head (cuBLAS on a GPU, the library's GEMM on a CPU) and
are reduced in fp32. The gradient of a token's log-prob is `g (onehot(t) - p) / T`, so:
- into `hidden` it is `-g R`, with `R = (p - onehot(t)) @ head / T` [N, D] computed in the forward, where the
  softmax already is (a second GEMM over the head there, none in backward);
- into `weight` it needs `g` and `p` together, so backward recomputes the logits, of the U used columns only
  (`h @ weight.T`): in `frozen` mode a step runs two GEMMs over the [V, D] head and two over [U, D], where
  recomputing everything took three over [V, D] and one over [U, D] (SmolLM2: U = 26k of V = 49k).
Entropy's gradient (`-g p (log p + H)`, which TRL's trainers leave at zero: they log it) takes the full
recomputation. At N = 32k tokens, V = 152k, fp32 logits would be 19.9 GB; a chunk is held to `chunk_bytes`
(256 MiB by default: 441 tokens at V = 152k).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import PemaError

__all__ = ["LOG_PROB_OUTPUTS", "compact_linear_log_probs"]

# What TRL's FusedCausalLMOutput holds per token, beside `log_probs` (always computed).
LOG_PROB_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_CHUNK_BYTES = 256 * 2**20
# fp32 bytes per logit a chunk holds at once: the logits (then log p), the softmax (then its gradient) and one
# temporary (p log p).
_BYTES_PER_LOGIT = 12


@dataclass(frozen=True)
class _Params:
    temperature: float
    outputs: tuple[str, ...]
    chunk: int  # tokens per chunk
    compute_dtype: torch.dtype


class _CompactLinearLogProbs(torch.autograd.Function):
    """Forward: per-token stats of `z = (hidden @ full_weight.T) / T`, the rows of `full_weight` [V', D] at
    `used` ([U] columns, or every column where None) being `weight`'s, and `R` (module docstring) where `hidden`
    wants a gradient. Backward: gradients of `log_probs` and `entropy` into `hidden` and `weight` ([U, D]) only."""

    @staticmethod
    def forward(ctx, hidden, weight, full_weight, used, targets, params: _Params):
        ctx.set_materialize_grads(False)  # entropy is mostly logged: no zero gradient to run backward for
        out, lse, hidden_grad_rows = _statistics(hidden, full_weight, targets, params, ctx.needs_input_grad[0])
        # The head is held on ctx, not saved: a frozen head's buffer is refreshed in place by the next forward
        # (DPO's reference pass runs between the policy's forward and backward), with the same rows until the
        # optimizer steps, which autograd's version check would refuse.
        ctx.save_for_backward(hidden, weight, used, targets, lse, hidden_grad_rows)
        ctx.full_weight, ctx.params = full_weight, params
        ctx.mark_non_differentiable(*(x for x in out[2:] if x is not None))
        return tuple(out)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, used, targets, lse, hidden_grad_rows = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = grad_weight = None
        if grad_entropy is not None:
            grad_hidden, grad_weight = _recomputed_gradients(ctx, grad_log_probs, grad_entropy)
        elif grad_log_probs is not None:
            g = grad_log_probs.float()
            if need_hidden:  # d log p_t / d h = -(p - onehot(t)) @ head / T = -R
                grad_hidden = hidden_grad_rows.float().mul_(-g[:, None])
            if need_weight:
                grad_weight = _used_rows_gradient(hidden, weight, used, ctx.full_weight, targets, lse, g, ctx.params)
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None)


def _statistics(hidden, full_weight, targets, params: _Params, need_hidden: bool):
    """([every LOG_PROB_OUTPUTS' [N] tensor or None], [N] fp32 lse, [N, D] R in the compute dtype or None)."""
    stats = {name: [] for name in LOG_PROB_OUTPUTS}
    lse_chunks = []
    head = full_weight.to(params.compute_dtype)  # cast once (under autocast), not per chunk
    hidden_grad_rows = hidden.new_empty(hidden.shape, dtype=params.compute_dtype) if need_hidden else None
    for start in range(0, hidden.shape[0], params.chunk):
        rows = slice(start, start + params.chunk)
        z = _logits(hidden[rows], head, params)
        t = targets[rows]
        lse = torch.logsumexp(z, dim=-1)
        lse_chunks.append(lse)
        stats["log_probs"].append(z.gather(1, t[:, None]).squeeze(1) - lse)
        if "log_sum_sq_probs" in params.outputs:
            stats["log_sum_sq_probs"].append(torch.logsumexp(2 * z, dim=-1) - 2 * lse)
        if "mean_logits" in params.outputs:
            stats["mean_logits"].append(z.mean(-1))
        if "is_top1" in params.outputs:
            stats["is_top1"].append(z.argmax(-1) == t)  # the first maximum, as TRL's kernel decides ties
        if "entropy" not in params.outputs and not need_hidden:
            continue
        log_p = z.sub_(lse[:, None])  # z is no longer needed as logits
        p = log_p.exp()
        if "entropy" in params.outputs:
            stats["entropy"].append(-(p * log_p).sum(-1))
        if need_hidden:  # R = (p - onehot(t)) @ head / T, in place of p
            dz = p.scatter_add_(1, t[:, None], p.new_full((len(t), 1), -1.0))
            dz = (dz if params.temperature == 1.0 else dz.div_(params.temperature)).to(params.compute_dtype)
            hidden_grad_rows[rows] = dz @ head
    out = [torch.cat(chunks) if chunks else None for chunks in stats.values()]
    if hidden.shape[0] == 0:  # no valid token: empty outputs of the right dtypes
        out = [None if name not in (*params.outputs, "log_probs") else
               hidden.new_zeros(0, dtype=torch.bool if name == "is_top1" else torch.float32)
               for name in LOG_PROB_OUTPUTS]
    lse = torch.cat(lse_chunks) if lse_chunks else hidden.new_zeros(0, dtype=torch.float32)
    return out, lse, hidden_grad_rows


def _used_rows_gradient(hidden, weight, used, full_weight, targets, lse, g, params: _Params):
    """[U, D] fp32 gradient of `sum(g * log_probs)` into the used rows: `(g (onehot(t) - p) / T)[:, used].T @ h`,
    the softmax of those U columns from their recomputed logits and the forward's lse."""
    dtype = params.compute_dtype
    if used is None:  # `restricted`: the head is `weight`, targets are its columns
        head_used, columns = full_weight.to(dtype), targets
    else:  # the buffer's rows, not `weight`'s: the forward's logits came from them (rounded to its dtype)
        head_used = full_weight.index_select(0, used).to(dtype)
        column_of = torch.full((full_weight.shape[0],), -1, dtype=torch.long, device=targets.device)
        column_of[used] = torch.arange(len(used), device=targets.device)
        columns = column_of[targets]  # -1: an unused target, whose one-hot has no used column
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, hidden.shape[0], params.chunk):
        rows = slice(start, start + params.chunk)
        h = hidden[rows].to(dtype)
        g_rows, c = g[rows, None], columns[rows, None]
        dz = _logits(h, head_used, params).sub_(lse[rows, None]).exp_().mul_(-g_rows)  # -g p
        dz.scatter_add_(1, c.clamp(min=0), torch.where(c >= 0, g_rows, 0.0))  # + g onehot(t)
        dz = dz if params.temperature == 1.0 else dz.div_(params.temperature)
        add_product_fp32(grad_weight, dz.to(dtype).t(), h)
    return grad_weight


def _recomputed_gradients(ctx, grad_log_probs, grad_entropy):
    """(grad_hidden fp32 or None, grad_weight fp32 or None) of log-probs and entropy, from the logits recomputed
    over the whole head."""
    hidden, weight, used, targets, lse, _ = ctx.saved_tensors
    full_weight, params = ctx.full_weight, ctx.params
    grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
    head = full_weight.to(params.compute_dtype)
    for start in range(0, hidden.shape[0], params.chunk):
        rows = slice(start, start + params.chunk)
        h = hidden[rows]
        z = _logits(h, head, params)
        log_p = z - lse[rows, None]
        p = log_p.exp()
        grad_z = torch.zeros_like(z)
        if grad_log_probs is not None:  # d log p_t / dz = onehot(t) - p
            g = grad_log_probs[rows, None].float()
            grad_z.addcmul_(p, g, value=-1).scatter_add_(1, targets[rows, None], g)
        # d H / dz = -p (log p + H)
        entropy = -(p * log_p).sum(-1, keepdim=True)
        grad_z.sub_(grad_entropy[rows, None].float() * p * (log_p + entropy))
        grad_z = (grad_z / params.temperature).to(params.compute_dtype)
        if grad_hidden is not None:
            grad_hidden[rows] = grad_z.matmul(head).float()
        if grad_weight is not None:
            grad_used = grad_z if used is None else grad_z.index_select(1, used)
            add_product_fp32(grad_weight, grad_used.t(), h.to(params.compute_dtype))
    return grad_hidden, grad_weight


# torch.addmm(..., out_dtype=torch.float32) of half inputs: CUDA only (the CPU build has no kernel for it). Set to
# False, with a warning, the first time a CUDA build refuses it: the exact fp32 GEMM then runs instead.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc` without rounding the product to `a`'s half dtype first: the head gradient
    sums one product per chunk of tokens (24 of them at N = 32k, V = 152k), and bf16 products summed in fp32 lose
    ~8 bits each time; on CUDA the GEMM still runs on half inputs (tensor cores) with an fp32 output."""
    global _ADDMM_OUT_DTYPE
    if a.is_cuda and _ADDMM_OUT_DTYPE and a.dtype in (torch.float16, torch.bfloat16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, NotImplementedError, TypeError) as error:  # a build without the dtype kernel
            _ADDMM_OUT_DTYPE = False
            warnings.warn(f"torch {torch.__version__} cannot add a {a.dtype} product into fp32 on CUDA "
                          f"({type(error).__name__}: {str(error)[:200]}); the head gradient's GEMM runs in fp32, "
                          f"exact but slower", RuntimeWarning, stacklevel=2)
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _logits(hidden: torch.Tensor, head: torch.Tensor, params: _Params) -> torch.Tensor:
    """[n, D] -> fp32 [n, V'] logits over the temperature, the GEMM in the compute (autocast) dtype of `head`."""
    logits = hidden.to(params.compute_dtype).matmul(head.t()).float()
    return logits if params.temperature == 1.0 else logits / params.temperature


def compact_linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    full_weight: torch.Tensor | None,
    used_ids: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    chunk_bytes: int = _CHUNK_BYTES,
) -> dict[str, torch.Tensor | None]:
    """Per-token `log softmax(hidden @ head.T / temperature)[target]` and the other `outputs`, without the [N, V]
    logits; gradients of `log_probs` and `entropy` flow to `hidden` and to `weight` ([U, D]) only.

    Args:
        hidden: [N, D] (the positions to score: ignored ones left out, as TRL's fused head does).
        weight: [U, D] trainable rows.
        full_weight: [V, D] the head whose rows at `used_ids` are `weight`'s (a `frozen` head's buffer, refreshed
            by the caller), or None where `weight` is the whole head (`restricted`: columns are compact).
        used_ids: [U] int64 columns of `full_weight` that are `weight`'s rows; None with `full_weight=None`.
        targets: [N] columns in [0, V') (original ids in `frozen` mode, compact columns in `restricted`).
        outputs: among :data:`LOG_PROB_OUTPUTS`; "log_probs" is always computed, the others are None unless named.

    Returns:
        {name: [N] tensor or None} for every name in :data:`LOG_PROB_OUTPUTS`: fp32 statistics, `is_top1` bool.
    """
    unknown = set(outputs) - set(LOG_PROB_OUTPUTS)
    if unknown:
        raise PemaError(f"unknown outputs {sorted(unknown)}; choose among {LOG_PROB_OUTPUTS}")
    if (full_weight is None) != (used_ids is None):
        raise PemaError("pass full_weight and used_ids together (frozen head), or neither (weight is the head)")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise PemaError(f"expected hidden [N, D], targets [N] and weight [U, D], got {tuple(hidden.shape)}, "
                        f"{tuple(targets.shape)} and {tuple(weight.shape)}")
    if temperature <= 0:
        raise PemaError(f"temperature must be positive, got {temperature}")
    head = weight.detach() if full_weight is None else full_weight
    chunk = max(1, chunk_bytes // (_BYTES_PER_LOGIT * head.shape[0]))
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    params = _Params(float(temperature), tuple(outputs), chunk, compute_dtype)
    with torch.autocast(device, enabled=False):
        values = _CompactLinearLogProbs.apply(hidden, weight, head, used_ids, targets.long(), params)
    return dict(zip(LOG_PROB_OUTPUTS, values))
