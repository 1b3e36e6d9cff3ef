"""`compact_linear_log_probs` (TRL's per-token outputs from a compact head) against full logits in PyTorch: every
statistic and the gradients of log-probs and entropy, frozen (a [V, D] head whose used rows train) and restricted
(the [U, D] rows are the head), over several token chunks, at a temperature, with ties and one token."""

import pytest
import torch
import torch.nn.functional as F

from pema_triton import PemaError
from pema_triton.ops.linear_log_probs import LOG_PROB_OUTPUTS, compact_linear_log_probs

V, D = 37, 6  # D not a power of two


def _case(n, frozen, seed=0):
    gen = torch.Generator().manual_seed(seed)
    used = torch.tensor([0, 3, 4, 11, 20, V - 1])
    full = torch.randn(V, D, generator=gen, dtype=torch.float64)
    weight = full[used].clone().requires_grad_(True)
    hidden = torch.randn(n, D, generator=gen, dtype=torch.float64, requires_grad=True)
    columns = used if frozen else torch.arange(len(used))
    targets = columns[torch.randint(0, len(used), (n,), generator=gen)]
    return hidden, weight, full, used, targets


def _expected(hidden, weight, full, used, targets, frozen, temperature):
    head = full.index_put((used,), weight) if frozen else weight  # differentiable in weight
    z = F.linear(hidden, head) / temperature
    log_p = z.log_softmax(-1)
    p = log_p.exp()
    return {"log_probs": log_p.gather(1, targets[:, None]).squeeze(1), "entropy": -(p * log_p).sum(-1),
            "log_sum_sq_probs": (p * p).sum(-1).log(), "mean_logits": z.mean(-1),
            "is_top1": z.argmax(-1) == targets}


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "restricted"])
@pytest.mark.parametrize("n, temperature", [(1, 1.0), (23, 0.7)])
@pytest.mark.parametrize("graded", [("log_probs",), ("log_probs", "entropy"), ("entropy",)],
                         ids=["log-probs grad (kept R, U-column backward)", "both grads (recomputed)", "entropy grad"])
def test_every_output_and_the_gradients_equal_full_logits(frozen, n, temperature, graded):
    hidden, weight, full, used, targets = _case(n, frozen)
    got = compact_linear_log_probs(hidden, weight, full if frozen else None, used if frozen else None, targets,
                                   temperature=temperature, outputs=LOG_PROB_OUTPUTS, chunk_bytes=12 * V * 5)
    want = _expected(hidden, weight, full, used, targets, frozen, temperature)
    for name in LOG_PROB_OUTPUTS:
        if name == "is_top1":
            assert torch.equal(got[name], want[name])
        else:
            torch.testing.assert_close(got[name], want[name].float(), msg=name)
    upstream = {name: torch.randn(n, dtype=torch.float64) for name in graded}
    grads = torch.autograd.grad(sum((got[k] * g).sum() for k, g in upstream.items()), (hidden, weight))
    want_grads = torch.autograd.grad(sum((want[k] * g).sum() for k, g in upstream.items()), (hidden, weight))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert grads[1].shape == (len(used), D)  # the compact rows' gradient, never [V, D]


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "restricted"])
def test_the_log_prob_gradient_of_one_input_alone(frozen):
    """Only `weight` trains (no R is kept), or only `hidden` (no logits recomputed in backward); a frozen target
    outside the used ids adds no one-hot to any used row."""
    hidden, weight, full, used, targets = _case(9, frozen, seed=1)
    if frozen:
        targets[0], targets[-1] = 1, V - 2  # unused ids
    want = _expected(hidden, weight, full, used, targets, frozen, 1.0)["log_probs"]
    for wanted in (hidden, weight):
        inputs = (hidden.detach().requires_grad_(wanted is hidden), weight.detach().requires_grad_(wanted is weight))
        got = compact_linear_log_probs(*inputs, full if frozen else None, used if frozen else None, targets,
                                       chunk_bytes=12 * V * 4)["log_probs"]
        (grad,) = torch.autograd.grad(got.sum(), inputs[0] if wanted is hidden else inputs[1])
        torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), wanted, retain_graph=True)[0],
                                   rtol=1e-5, atol=1e-6)


def test_the_unused_rows_of_a_frozen_head_count_in_the_softmax_and_get_no_gradient():
    hidden, weight, full, used, _ = _case(4, True)
    targets = torch.tensor([1, 2, 5, V - 2])  # unused ids: their own rows score them
    got = compact_linear_log_probs(hidden, weight, full, used, targets)
    want = _expected(hidden, weight, full, used, targets, True, 1.0)
    torch.testing.assert_close(got["log_probs"], want["log_probs"].float())
    assert got["entropy"] is None and got["is_top1"] is None  # only what was asked for


def test_ties_are_decided_for_the_first_maximum_and_no_token_gives_empty_outputs():
    weight = torch.ones(3, 4, requires_grad=True)  # every logit equal
    hidden, targets = torch.randn(2, 4), torch.tensor([0, 2])
    got = compact_linear_log_probs(hidden, weight, None, None, targets, outputs=("is_top1",))
    assert got["is_top1"].tolist() == [True, False]
    empty = compact_linear_log_probs(hidden[:0], weight, None, None, targets[:0], outputs=("entropy",))
    assert empty["log_probs"].shape == (0,) and empty["entropy"].shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    ({"outputs": ("logits",)}, "unknown outputs"),
    ({"temperature": 0.0}, "temperature must be positive"),
])
def test_bad_arguments_are_typed_errors(kwargs, match):
    with pytest.raises(PemaError, match=match):
        compact_linear_log_probs(torch.randn(2, 4), torch.randn(3, 4), None, None, torch.tensor([0, 1]), **kwargs)


def test_a_bf16_head_gradient_is_summed_over_chunks_in_fp32():
    """256 one-token chunks of a bf16 head give the [U, D] gradient one chunk of all 256 tokens gives: the chunks'
    products are summed in fp32 and rounded to bf16 once, as TRL's ChunkedLogProbFunction sums them. (Rounded to
    bf16 chunk by chunk they were up to 5.9% off here: 0.031 on a gradient of 0.53.)"""

    def head_gradient(chunk_bytes):
        hidden, weight, full, used, targets = _case(256, frozen=True, seed=3)
        hidden, weight, full = (t.detach().to(torch.bfloat16) for t in (hidden, weight, full))
        weight.requires_grad_(True)
        got = compact_linear_log_probs(hidden, weight, full, used, targets, chunk_bytes=chunk_bytes)
        return torch.autograd.grad(got["log_probs"].sum(), weight)[0].float()

    one_chunk, token_chunks = head_gradient(12 * V * 256), head_gradient(12 * V)
    torch.testing.assert_close(token_chunks, one_chunk, rtol=2**-8, atol=1e-4)  # one bf16 ulp at most
