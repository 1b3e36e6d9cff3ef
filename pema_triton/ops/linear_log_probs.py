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

from dataclasses import dataclass
from types import ModuleType

import torch
from torch._subclasses.fake_tensor import is_fake

from ..errors import PemaError
from ._checks import accumulation_dtype, check_linear_cross_entropy_inputs
from .dispatch import kernels_or_reference, uses_kernels
from .linear_cross_entropy import add_chunk_gradients, add_product_fp32, default_chunk_bytes

__all__ = ["LOG_PROB_OUTPUTS", "UniformGradHint", "compact_linear_log_probs"]

# What TRL's FusedCausalLMOutput holds per token, beside `log_probs` (always computed).
LOG_PROB_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Accumulation-dtype copies of a chunk's logits that the full recomputation (entropy's gradient) holds at once: the
# logits, log p, p, their gradient and two temporaries.
_RECOMPUTE_COPIES = 6


class UniformGradHint:
    """Whether the upstream gradient of `log_probs` has been one value for every token (SFT's NLL: `-1 / N` each)
    in the calls so far. While it has, the forward also makes `G = (p - onehot)[:, used].T @ h / T` (one GEMM over
    [U, D], where the softmax already is) and backward's head gradient is `-c G` for that value `c`, instead of
    recomputing the U used columns' logits (two GEMMs); the check is one host read of a reduction over [N]. The
    first backward whose gradient differs (GRPO's advantages, DFT's weights) falls back to the recomputation and
    clears `expected`, so later forwards make no `G`: one wasted GEMM over [U, D], once."""

    def __init__(self, expected: bool = True):
        self.expected = expected

    def __repr__(self) -> str:
        return f"UniformGradHint(expected={self.expected})"


@dataclass(frozen=True)
class _Params:
    """temperature, outputs: as given. chunk: tokens per chunk. compute_dtype: the GEMMs' (the autocast dtype, else
    the hidden states'). rows: :mod:`~pema_triton.ops.kernels` or :mod:`~pema_triton.ops.reference`, whose
    `log_prob_rows` runs the forward's row pass."""

    temperature: float
    outputs: tuple[str, ...]
    chunk: int
    recompute_chunk: int  # tokens per chunk where entropy's gradient recomputes every logit in torch
    compute_dtype: torch.dtype
    rows: ModuleType
    hint: UniformGradHint | None  # speculate a uniform upstream gradient (the head gradient made in the forward)
    grad_enabled: bool  # grad mode at the call: `needs_input_grad` says True under torch.no_grad() too


class _CompactLinearLogProbs(torch.autograd.Function):
    """Forward: per-token stats of `z = (hidden @ full_weight.T) / T`, the rows of `full_weight` [V', D] at
    `used` ([U] columns, or every column where None) being `weight`'s, and `R` (module docstring) where `hidden`
    wants a gradient. Backward: gradients of `log_probs` and `entropy` into `hidden` and `weight` ([U, D]) only."""

    @staticmethod
    def forward(ctx, hidden, weight, full_weight, used, targets, params: _Params):
        ctx.set_materialize_grads(False)  # entropy is mostly logged: no zero gradient to run backward for
        need_hidden, need_weight = (need and params.grad_enabled for need in ctx.needs_input_grad[:2])
        # Not while torch.compile traces: backward's check is a host read, a data-dependent branch in its graph.
        speculate = (need_weight and params.hint is not None and params.hint.expected
                     and not (torch.compiler.is_compiling() or is_fake(hidden)))
        out, lse, hidden_grad_rows, uniform_weight_grad = _statistics(
            hidden, full_weight, used, weight.shape[0], targets, params, need_hidden, speculate)
        # The head is held on ctx, not saved: a frozen head's buffer is refreshed in place by the next forward
        # (DPO's reference pass runs between the policy's forward and backward), with the same rows until the
        # optimizer steps, which autograd's version check would refuse.
        ctx.save_for_backward(hidden, weight, used, targets, lse, hidden_grad_rows, uniform_weight_grad)
        ctx.full_weight, ctx.params = full_weight, params
        ctx.mark_non_differentiable(*(x for x in out[2:] if x is not None))
        return tuple(out)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, used, targets, lse, hidden_grad_rows, uniform_weight_grad = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = grad_weight = None
        if grad_entropy is not None:
            grad_hidden, grad_weight = _recomputed_gradients(ctx, grad_log_probs, grad_entropy)
        elif grad_log_probs is not None:
            g = grad_log_probs.to(lse.dtype)
            if need_hidden:  # d log p_t / d h = -(p - onehot(t)) @ head / T = -R
                grad_hidden = hidden_grad_rows.to(lse.dtype).mul_(-g[:, None])
            if need_weight and uniform_weight_grad is not None and _uniform(g):  # d / d W of c * sum(log p) = -c G
                grad_weight = uniform_weight_grad.mul(-g[0]) if len(g) else uniform_weight_grad
            elif need_weight:
                if uniform_weight_grad is not None:  # speculated, and the gradient is not uniform: not again
                    ctx.params.hint.expected = False
                grad_weight = _used_rows_gradient(hidden, weight, used, ctx.full_weight, targets, lse, g, ctx.params)
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None)


def _uniform(g: torch.Tensor) -> bool:
    """Whether every token's upstream gradient is the same value (a host read: a sync on a GPU)."""
    return len(g) == 0 or bool((g == g[0]).all())


def _statistics(hidden, full_weight, used, num_rows, targets, params: _Params, need_hidden: bool, speculate: bool):
    """([every LOG_PROB_OUTPUTS' [N] tensor or None], [N] lse, [N, D] R in the compute dtype or None, [U, D] G in
    the accumulation dtype where `speculate`, else None); statistics in the accumulation dtype (fp32, fp64 for
    fp64). G is `(p - onehot)[:, used].T @ h / T`: the head gradient of `-sum(log_probs)`."""
    stats = {name: [] for name in LOG_PROB_OUTPUTS}
    lse_chunks = []
    dtype, outputs = params.compute_dtype, params.outputs
    head = full_weight.to(dtype)  # cast once (under autocast), not per chunk
    hidden_grad_rows = hidden.new_empty(hidden.shape, dtype=dtype) if need_hidden else None
    acc = accumulation_dtype(dtype)
    uniform_weight_grad = hidden.new_zeros(num_rows, hidden.shape[1], dtype=acc) if speculate else None
    for start in range(0, hidden.shape[0], params.chunk):
        rows = slice(start, start + params.chunk)
        t = targets[rows]
        logits = hidden[rows].to(dtype) @ head.t()  # [n, V'], overwritten by the row pass
        lse_of_squares = None
        if "log_sum_sq_probs" in outputs or "mean_logits" in outputs:  # rarely asked: torch passes, first
            z = logits.to(accumulation_dtype(dtype)) / params.temperature
            if "log_sum_sq_probs" in outputs:  # log sum p^2 = logsumexp(2 z) - 2 lse, lse from the row pass
                lse_of_squares = torch.logsumexp(2 * z, dim=-1)
            if "mean_logits" in outputs:
                stats["mean_logits"].append(z.mean(-1))
        row = params.rows.log_prob_rows(logits, t, params.temperature, entropy="entropy" in outputs,
                                        top1="is_top1" in outputs, write_grad=need_hidden or speculate)
        if lse_of_squares is not None:
            stats["log_sum_sq_probs"].append(lse_of_squares - 2 * row.lse)
        lse_chunks.append(row.lse)
        stats["log_probs"].append(row.log_probs)
        if row.entropy is not None:
            stats["entropy"].append(row.entropy)
        if row.argmax is not None:
            stats["is_top1"].append(row.argmax == t)  # the first maximum, as TRL's kernel decides ties
        if need_hidden or speculate:  # R = (p - onehot(t)) @ head / T, and G
            add_chunk_gradients(row.grad, head, hidden[rows].to(dtype), used,
                                None if hidden_grad_rows is None else hidden_grad_rows[rows], uniform_weight_grad)
    out = [torch.cat(chunks) if chunks else None for chunks in stats.values()]
    if hidden.shape[0] == 0:  # no valid token: empty outputs of the right dtypes
        out = [None if name not in (*outputs, "log_probs") else
               hidden.new_zeros(0, dtype=torch.bool if name == "is_top1" else acc) for name in LOG_PROB_OUTPUTS]
    lse = torch.cat(lse_chunks) if lse_chunks else hidden.new_zeros(0, dtype=acc)
    return out, lse, hidden_grad_rows, uniform_weight_grad


def _used_rows_gradient(hidden, weight, used, full_weight, targets, lse, g, params: _Params):
    """[U, D] fp32 (fp64) gradient of `sum(g * log_probs)` into the used rows: `(g (onehot(t) - p) / T)[:, used].T @ h`,
    the softmax of those U columns from their recomputed logits and the forward's lse."""
    dtype = params.compute_dtype
    if used is None:  # `restricted`: the head is `weight`, targets are its columns
        head_used, columns = full_weight.to(dtype), targets
    else:  # the buffer's rows, not `weight`'s: the forward's logits came from them (rounded to its dtype)
        head_used = full_weight.index_select(0, used).to(dtype)
        column_of = torch.full((full_weight.shape[0],), -1, dtype=torch.long, device=targets.device)
        column_of[used] = torch.arange(len(used), device=targets.device)
        columns = column_of[targets]  # -1: an unused target, whose one-hot has no used column
    grad_weight = torch.zeros_like(weight, dtype=lse.dtype)
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
    """(grad_hidden, grad_weight: fp32 (fp64) or None) of log-probs and entropy, from the logits recomputed
    over the whole head."""
    hidden, weight, used, targets, lse, *_ = ctx.saved_tensors
    full_weight, params = ctx.full_weight, ctx.params
    grad_hidden = torch.zeros_like(hidden, dtype=lse.dtype) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
    head = full_weight.to(params.compute_dtype)
    for start in range(0, hidden.shape[0], params.recompute_chunk):
        rows = slice(start, start + params.recompute_chunk)
        h = hidden[rows]
        z = _logits(h, head, params)
        log_p = z - lse[rows, None]
        p = log_p.exp()
        grad_z = torch.zeros_like(z)
        if grad_log_probs is not None:  # d log p_t / dz = onehot(t) - p
            g = grad_log_probs[rows, None].to(lse.dtype)
            grad_z.addcmul_(p, g, value=-1).scatter_add_(1, targets[rows, None], g)
        # d H / dz = -p (log p + H)
        entropy = -(p * log_p).sum(-1, keepdim=True)
        grad_z.sub_(grad_entropy[rows, None].to(lse.dtype) * p * (log_p + entropy))
        grad_z = (grad_z / params.temperature).to(params.compute_dtype)
        if grad_hidden is not None:
            grad_hidden[rows] = grad_z.matmul(head).to(lse.dtype)
        if grad_weight is not None:
            grad_used = grad_z if used is None else grad_z.index_select(1, used)
            add_product_fp32(grad_weight, grad_used.t(), h.to(params.compute_dtype))
    return grad_hidden, grad_weight


def _logits(hidden: torch.Tensor, head: torch.Tensor, params: _Params) -> torch.Tensor:
    """[n, D] -> [n, V'] logits over the temperature in the accumulation dtype (fp32, fp64 for fp64), the GEMM in
    the compute (autocast) dtype of `head`."""
    logits = hidden.to(params.compute_dtype).matmul(head.t()).to(accumulation_dtype(params.compute_dtype))
    return logits if params.temperature == 1.0 else logits / params.temperature


def _tokens_per_chunk(width: int, num_used: int, dtype: torch.dtype, kernels: bool, gathers: bool,
                      chunk_bytes: int) -> tuple[int, int]:
    """(tokens per chunk, tokens per chunk of the full recomputation) within `chunk_bytes`. Per token: the
    forward's [V'] logits (the kernel works in their memory; the reference too in fp32, and beside a half chunk
    holds an fp32 copy and the gradient's cast) and, speculating a uniform gradient, their gradient's [U] used
    columns gathered; the backward's [U] used columns (fp32 and their gradient in the compute dtype)."""
    size, acc = (torch.empty(0, dtype=d).element_size() for d in (dtype, accumulation_dtype(dtype)))
    per_logit = size if kernels or size == acc else 2 * size + acc
    per_token = max(per_logit * width + (size * num_used if gathers else 0), (acc + size) * num_used)
    return max(1, chunk_bytes // per_token), max(1, chunk_bytes // (_RECOMPUTE_COPIES * acc * width))


def compact_linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    full_weight: torch.Tensor | None,
    used_ids: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    backend: str = "auto",
    chunk_bytes: int | None = None,
    uniform_grad_hint: UniformGradHint | None = None,
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
        backend: the forward's row pass ("auto": Triton on a GPU); the GEMMs are torch's on every backend.
        chunk_bytes: a chunk's transient memory; by default
            :func:`~pema_triton.ops.linear_cross_entropy.default_chunk_bytes` (512 MiB on a GPU, at most a quarter
            of its free memory; 256 MiB on a CPU).
        uniform_grad_hint: where the caller expects `log_probs`' upstream gradient to be one value for every token
            (an NLL loss), a :class:`UniformGradHint` kept across calls: the head gradient is then made in the
            forward (see there); None: never speculate.

    Returns:
        {name: [N] tensor or None} for every name in :data:`LOG_PROB_OUTPUTS`: fp32 statistics (fp64 for fp64),
        `is_top1` bool.
    """
    unknown = set(outputs) - set(LOG_PROB_OUTPUTS)
    if unknown:
        raise PemaError(f"unknown outputs {sorted(unknown)}; choose among {LOG_PROB_OUTPUTS}")
    check_linear_cross_entropy_inputs(hidden, weight, full_weight, used_ids, targets)
    if temperature <= 0:
        raise PemaError(f"temperature must be positive, got {temperature}")
    head = weight.detach() if full_weight is None else full_weight
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    kernels = uses_kernels(backend, hidden.device)
    chunk_bytes = default_chunk_bytes(hidden.device) if chunk_bytes is None else chunk_bytes
    gathers = uniform_grad_hint is not None and used_ids is not None
    params = _Params(float(temperature), tuple(outputs), *_tokens_per_chunk(head.shape[0], weight.shape[0],
                     compute_dtype, kernels, gathers, chunk_bytes), compute_dtype, kernels_or_reference(kernels),
                     uniform_grad_hint, torch.is_grad_enabled())
    with torch.autocast(device, enabled=False):
        values = _CompactLinearLogProbs.apply(hidden, weight, head, used_ids, targets.long(), params)
    return dict(zip(LOG_PROB_OUTPUTS, values))
