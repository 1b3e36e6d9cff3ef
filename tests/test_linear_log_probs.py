"""`compact_linear_log_probs` (TRL's per-token outputs from a compact head) against full logits in PyTorch: every
statistic and the gradients of log-probs and entropy, frozen (a [V, D] head whose used rows train) and restricted
(the [U, D] rows are the head), over several token chunks, at a temperature, with ties and one token."""

import pytest
import torch
import torch.nn.functional as F

from helpers.devices import BACKENDS, DEVICE
from pema_triton import PemaError
from pema_triton.ops import dispatch, linear_log_probs, reference
from pema_triton.ops.linear_log_probs import LOG_PROB_OUTPUTS, UniformGradHint, compact_linear_log_probs

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "restricted"])
@pytest.mark.parametrize("n, temperature", [(1, 1.0), (23, 0.7)])
@pytest.mark.parametrize("graded", [("log_probs",), ("log_probs", "entropy"), ("entropy",)],
                         ids=["log-probs grad (kept R, U-column backward)", "both grads (recomputed)", "entropy grad"])
def test_every_output_and_the_gradients_equal_full_logits(frozen, n, temperature, graded, backend):
    """fp64 throughout (statistics too), so the fused op and full logits agree to fp64 round-off."""
    hidden, weight, full, used, targets = _case(n, frozen)
    got = compact_linear_log_probs(hidden, weight, full if frozen else None, used if frozen else None, targets,
                                   temperature=temperature, outputs=LOG_PROB_OUTPUTS, backend=backend,
                                   chunk_bytes=8 * V * 5)  # 5 tokens a chunk (1 recomputing): several chunks
    want = _expected(hidden, weight, full, used, targets, frozen, temperature)
    for name in LOG_PROB_OUTPUTS:
        if name == "is_top1":
            assert torch.equal(got[name], want[name])
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)
    gen = torch.Generator().manual_seed(5)
    upstream = {name: torch.randn(n, dtype=torch.float64, generator=gen) for name in graded}
    grads = torch.autograd.grad(sum((got[k] * g).sum() for k, g in upstream.items()), (hidden, weight))
    want_grads = torch.autograd.grad(sum((want[k] * g).sum() for k, g in upstream.items()), (hidden, weight))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
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
                                       chunk_bytes=8 * V * 4)["log_probs"]
        (grad,) = torch.autograd.grad(got.sum(), inputs[0] if wanted is hidden else inputs[1])
        torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), wanted, retain_graph=True)[0],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "restricted"])
def test_a_uniform_upstream_gradient_takes_the_head_gradient_made_in_the_forward(frozen, backend, monkeypatch):
    """SFT's NLL (one upstream value per token): the hint's speculation holds, backward recomputes nothing and the
    gradients are exact. GRPO-like weights: backward falls back (exact too), clears the hint, and the next forward
    makes no head gradient."""
    hidden, weight, full, used, targets = _case(23, frozen, seed=4)
    targets[3] = 7 if frozen else targets[3]  # an unused id's row: no one-hot in any used row
    full, used = (full, used) if frozen else (None, None)
    want = _expected(hidden, weight, full if frozen else None, used, targets, frozen, 0.7)["log_probs"]
    hint, calls = UniformGradHint(), {"recomputed": 0, "forward products": 0}
    recompute, gradients = linear_log_probs._used_rows_gradient, linear_log_probs.add_chunk_gradients

    def counted(name, fn, counts=lambda args: True):
        def wrapper(*args, **kwargs):
            calls[name] += counts(args)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(linear_log_probs, "_used_rows_gradient", counted("recomputed", recompute))
    # A chunk's gradient GEMMs with a head gradient to add into (their last argument): G made in the forward.
    monkeypatch.setattr(linear_log_probs, "add_chunk_gradients",
                        counted("forward products", gradients, lambda args: args[-1] is not None))
    for weights, recomputed in ((torch.full((23,), -1 / 23, dtype=torch.float64), 0),
                                (torch.linspace(-1, 1, 23, dtype=torch.float64), 1)):
        got = compact_linear_log_probs(hidden, weight, full, used, targets, temperature=0.7, backend=backend,
                                       chunk_bytes=8 * V * 5, uniform_grad_hint=hint)["log_probs"]
        assert calls["forward products"] > 0  # G made in the forward (several chunks)
        grads = torch.autograd.grad((got * weights).sum(), (hidden, weight))
        want_grads = torch.autograd.grad((want * weights).sum(), (hidden, weight), retain_graph=True)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert calls["recomputed"] == recomputed and hint.expected == (recomputed == 0)
        calls["forward products"] = 0
    compact_linear_log_probs(hidden, weight, full, used, targets, uniform_grad_hint=hint)
    assert calls["forward products"] == 0  # the hint was cleared: no speculation any more
    hint.expected, row_pass, grads_written = True, reference.log_prob_rows, []
    monkeypatch.setattr(reference, "log_prob_rows", lambda *a, **k: grads_written.append(k["write_grad"]) or
                        row_pass(*a, **k))
    with torch.no_grad():  # a reference model's pass: no gradient to prepare, though the inputs require one
        compact_linear_log_probs(hidden, weight, full, used, targets, uniform_grad_hint=hint, backend="torch")
    assert calls["forward products"] == 0 and grads_written == [False]  # neither G nor R


@pytest.mark.slow  # compiles (the fast tier compiles nothing)
@pytest.mark.parametrize("uniform", [True, False], ids=["NLL", "per-token weights"])
def test_compiled_with_the_hint_gives_the_eager_gradients(uniform):
    """torch.compile(fullgraph=True) over the op with a hint: no speculation while tracing (backward's uniformity
    check is a host read: data-dependent, it failed the compile), the eager gradients."""
    hidden, weight, full, used, targets = (t.float() if t.is_floating_point() else t for t in _case(12, True, seed=6))
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    weights = torch.full((12,), -1 / 12) if uniform else torch.linspace(-1, 1, 12)

    def step(h, w, hint):
        out = compact_linear_log_probs(h, w, full, used, targets, backend="torch", chunk_bytes=4 * V * 5,
                                       uniform_grad_hint=hint)  # log-probs alone: with entropy among the outputs
        # the compiled backward gets a zero entropy gradient (not None) and recomputes everything
        return (out["log_probs"] * weights).sum()

    want = torch.autograd.grad(step(hidden, weight, UniformGradHint()), (hidden, weight))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # AOTAutograd traces backward: the point
    got = torch.autograd.grad(compiled(hidden, weight, UniformGradHint()), (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_unused_rows_of_a_frozen_head_count_in_the_softmax_and_get_no_gradient():
    hidden, weight, full, used, _ = _case(4, True)
    targets = torch.tensor([1, 2, 5, V - 2])  # unused ids: their own rows score them
    got = compact_linear_log_probs(hidden, weight, full, used, targets)
    want = _expected(hidden, weight, full, used, targets, True, 1.0)
    torch.testing.assert_close(got["log_probs"], want["log_probs"])
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


@pytest.mark.parametrize("hint", [None, True], ids=["recomputed", "made in the forward"])
def test_a_bf16_head_gradient_is_summed_over_chunks_in_fp32(hint):
    """256 one-token chunks of a bf16 head give the [U, D] gradient one chunk of all 256 tokens gives: the chunks'
    products are summed in fp32 and rounded to bf16 once, as TRL's ChunkedLogProbFunction sums them. (Rounded to
    bf16 chunk by chunk they were up to 5.9% off here: 0.031 on a gradient of 0.53.)"""

    def head_gradient(chunk_bytes):
        hidden, weight, full, used, targets = _case(256, frozen=True, seed=3)
        hidden, weight, full = (t.detach().to(torch.bfloat16) for t in (hidden, weight, full))
        weight.requires_grad_(True)
        got = compact_linear_log_probs(hidden, weight, full, used, targets, chunk_bytes=chunk_bytes,
                                       uniform_grad_hint=hint and UniformGradHint())
        return torch.autograd.grad(got["log_probs"].sum(), weight)[0].float()

    one_chunk, token_chunks = head_gradient(12 * V * 256), head_gradient(12 * V)
    torch.testing.assert_close(token_chunks, one_chunk, rtol=2**-8, atol=1e-4)  # one bf16 ulp at most


# Rows that hurt the row pass: V' over the interpreter's block (1,500 > 1,024) and not a power of two, one token,
# every target the same, targets 0 and V' - 1, every logit equal (ties), one logit far above the rest (entropy ~0).
LOG_PROB_ROWS = [("V1500", 1500, 5, "random"), ("N1", 300, 1, "random"), ("same", 1500, 6, "same"),
                 ("ends", 1029, 4, "ends"), ("ties", 1100, 3, "ties"), ("peaked", 1500, 3, "peaked")]


def _rows(width, n, how, dtype):
    gen = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(n, width, generator=gen)
    targets = torch.randint(0, width, (n,), generator=gen)
    if how == "ties":
        logits[:] = 1.5
        targets = torch.tensor([0, 1, width - 1])
    elif how == "peaked":
        logits[:, 1234] += 60.0
    targets = {"same": torch.full((n,), 7), "ends": torch.tensor([0, width - 1, 0, width - 1])}.get(how, targets)
    return logits.to(dtype), targets


@pytest.mark.parametrize("name, width, n, how", LOG_PROB_ROWS, ids=[c[0] for c in LOG_PROB_ROWS])
def test_log_prob_row_pass_reference_equals_torchs_formulas(name, width, n, how):
    logits, targets = _rows(width, n, how, torch.float64)
    z = logits / 0.7
    got = reference.log_prob_rows(logits.clone(), targets, 0.7, entropy=True, top1=True)
    log_p = z.log_softmax(-1)
    torch.testing.assert_close(got.log_probs, log_p.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(got.entropy, -(log_p.exp() * log_p).sum(-1))
    assert torch.equal(got.argmax, z.argmax(-1))
    for entropy in (False, True):  # the gradient in the logits' memory, or beside the softmax the entropy reads
        grad = reference.log_prob_rows(logits.clone(), targets, 0.7, entropy=entropy, write_grad=True).grad
        torch.testing.assert_close(grad, (log_p.exp() - F.one_hot(targets, width)) / 0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name, width, n, how", LOG_PROB_ROWS, ids=[c[0] for c in LOG_PROB_ROWS])
def test_log_prob_row_pass_kernel_equals_the_reference(name, width, n, how, dtype):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    logits, targets = _rows(width, n, how, dtype)
    targets = targets.to(DEVICE)
    kernels = dispatch.kernels_or_reference(True)
    for temperature, write_grad in ((1.0, False), (0.7, True)):
        got_z, want_z = logits.to(DEVICE, copy=True), logits.to(DEVICE, copy=True)
        got = kernels.log_prob_rows(got_z, targets, temperature, entropy=True, top1=True, write_grad=write_grad)
        want = reference.log_prob_rows(want_z, targets, temperature, entropy=True, top1=True, write_grad=write_grad)
        eps = torch.finfo(got.lse.dtype).eps
        for field in ("log_probs", "lse", "entropy"):  # entropy to 1e-6 even where it is ~1e-25 ("peaked")
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=16 * eps,
                                       atol=16 * eps * 4 * width ** 0.5, msg=field)
        assert torch.equal(got.argmax, want.argmax)
        if write_grad:  # one rounding of the logits' dtype apart, and exp(z - lse) against exp(z - max) / sum:
            tol = 2 * torch.finfo(dtype).eps + 64 * eps  # an exponent of |z / T - lse| ~ 20 carries ~20 ulps
            assert got.grad is got_z  # the kernel writes in place
            torch.testing.assert_close(got.grad, want.grad, rtol=tol, atol=tol)
        else:
            assert torch.equal(got_z, logits.to(DEVICE)) and got.grad is None and want.grad is None  # untouched
        no_stats = kernels.log_prob_rows(logits.to(DEVICE, copy=True), targets, temperature)
        assert no_stats.entropy is None and no_stats.argmax is None
        assert torch.equal(no_stats.log_probs, got.log_probs)
