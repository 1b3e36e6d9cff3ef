"""Fused head + cross-entropy over compact rows: the reference against plain F.linear + F.cross_entropy in fp64,
and the Triton kernels against the reference, on shapes that hurt."""

import pytest
import torch
import torch.nn.functional as F

from helpers.devices import BACKENDS, DEVICE
from pema_triton.errors import PemaDTypeError, PemaError
from pema_triton.ops import build_remap, compact_linear_cross_entropy, reference

# (id, V, U, D, N, what the targets are)
CASES = [
    ("D40", 97, 20, 40, 37, "random"),
    ("N1", 50, 7, 24, 1, "random"),
    ("U1", 40, 1, 16, 9, "random"),
    ("U=V", 33, 33, 19, 12, "random"),
    ("ids-0-and-V-1", 130, 10, 72, 20, "ends"),
    ("mostly-ignored", 64, 12, 32, 25, "ignored"),
    ("same-target", 80, 9, 48, 30, "same"),
]
CASE_IDS = [c[0] for c in CASES]


def _case(vocab_size, num_used, dim, num_tokens, how, seed=0):
    """used ids, remap, the full [V, D] head in fp64, hidden [N, D] fp64, targets [N]."""
    gen = torch.Generator().manual_seed(seed)
    used = torch.randperm(vocab_size, generator=gen)[:num_used].sort().values
    full = torch.randn(vocab_size, dim, generator=gen, dtype=torch.float64)
    hidden = torch.randn(num_tokens, dim, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    if how == "ends":
        targets[:2] = torch.tensor([0, vocab_size - 1])
    elif how == "ignored":
        targets[1:] = -100
    elif how == "same":
        targets[:] = int(used[0])
    return used, build_remap(used, vocab_size), full, hidden, targets


def _fused(used, remap, full, hidden, targets, dtype, backend, **kwargs):
    frozen = full.clone()
    frozen[used] = float("nan")  # stale trainable rows in the frozen matrix are never read
    h = hidden.to(DEVICE, dtype, copy=True).requires_grad_()
    w = full[used].to(DEVICE, dtype).requires_grad_()
    loss = compact_linear_cross_entropy(h, w, frozen.to(DEVICE, dtype), remap.to(DEVICE), targets.to(DEVICE),
                                        backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("num_items", [None, 50])
@pytest.mark.parametrize("name, V, U, D, N, how", CASES, ids=CASE_IDS)
def test_reference_equals_linear_and_cross_entropy_in_fp64(name, V, U, D, N, how, num_items, monkeypatch):
    monkeypatch.setattr(reference, "_TOKEN_CHUNK", 8)  # several token and vocabulary chunks
    monkeypatch.setattr(reference, "_VOCAB_CHUNK", 16)
    used, remap, full, hidden, targets = _case(V, U, D, N, how)
    loss, grad_hidden, grad_weight = _fused(used, remap, full, hidden, targets, torch.float64, "torch",
                                            num_items_in_batch=num_items)

    h, w = hidden.clone().requires_grad_(), full.clone().requires_grad_()
    reduction = "mean" if num_items is None else "sum"
    expected = F.cross_entropy(h @ w.t(), targets, reduction=reduction) / (num_items or 1)
    expected.backward()
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_hidden.cpu(), h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_weight.cpu(), w.grad[used], rtol=1e-10, atol=1e-12)  # [U, D] only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name, V, U, D, N, how", CASES, ids=CASE_IDS)
def test_triton_equals_the_reference(name, V, U, D, N, how, dtype):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    case = _case(V, U, D, N, how)
    tri = _fused(*case, dtype, "triton")
    ref = _fused(*case, dtype, "torch")
    # The same products of the same rounded inputs, summed in another order. For half inputs the logit gradient
    # is rounded to `dtype` before its two GEMMs (as autograd's is), so an order-dependent last bit of the softmax
    # can move one of its terms by one ulp: a bound of eps(dtype) on the gradient's scale, not its element.
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(tri[0], ref[0], rtol=64 * acc_eps, atol=64 * acc_eps)
    # Each gradient is a sum of head rows (hidden rows) weighted by softmax terms whose absolute sum per token is at
    # most 2: its round-off is relative to the rows' magnitude, not to the (cancelling) result.
    scale_eps = 64 * acc_eps if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    _, _, full, hidden, _ = case
    for got, want, rows in zip(tri[1:], ref[1:], (full, hidden)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=scale_eps * float(rows.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_logit_gemm_in_the_autocast_dtype(backend):
    used, remap, full, hidden, targets = _case(97, 20, 40, 37, "random")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = _fused(used, remap, full.float(), hidden.float(), targets, torch.float32,
                                                backend)
    assert loss.dtype == torch.float32 and grad_hidden.dtype == grad_weight.dtype == torch.float32
    rounded = _fused(used, remap, full.bfloat16().double(), hidden.bfloat16().double(), targets, torch.float64,
                     "torch")
    torch.testing.assert_close(loss.double(), rounded[0], rtol=1e-5, atol=1e-5)  # bf16 inputs, fp32 sums


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what, change, error", [
    ("float targets", lambda a: a | {"targets": a["targets"].double()}, PemaDTypeError),
    ("int hidden", lambda a: a | {"hidden": a["hidden"].long()}, PemaDTypeError),
    ("weight of another width", lambda a: a | {"weight": a["weight"][:, :-1]}, PemaError),
    ("frozen rows not [V, D]", lambda a: a | {"frozen_weight": a["frozen_weight"][:-1]}, PemaError),
    ("remap of another dtype", lambda a: a | {"remap": a["remap"].long()}, PemaError),
])
def test_bad_inputs_are_typed_errors_before_any_kernel(what, change, error, backend):
    """Both implementations run the same checks (ops/_checks.py) on what the op is given."""
    used, remap, full, hidden, targets = _case(97, 20, 40, 9, "random")
    args = {"hidden": hidden.float().to(DEVICE), "weight": full[used].float().to(DEVICE),
            "frozen_weight": full.float().to(DEVICE), "remap": remap.to(DEVICE), "targets": targets.to(DEVICE)}
    with pytest.raises(error):
        compact_linear_cross_entropy(**change(args), backend=backend)


def test_frozen_weight_none_trains_every_row_as_the_identity_remap_would():
    """`restricted`'s case: every row trainable, nothing frozen to pass."""
    used, _, full, hidden, _ = _case(97, 20, 40, 9, "random")
    targets = torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(1))
    weight = full[used].clone().requires_grad_()
    got = compact_linear_cross_entropy(hidden, weight, None, build_remap(torch.arange(20), 20), targets,
                                       backend="torch")
    expected = F.cross_entropy(hidden @ full[used].t(), targets)
    torch.testing.assert_close(got, expected.float() if got.dtype == torch.float32 else expected)
    with pytest.raises(PemaError, match="frozen_weight=None needs a remap of the U = 20 rows"):
        compact_linear_cross_entropy(hidden, weight, None, build_remap(used, 97), targets, backend="torch")


def test_deterministic_mode_is_honoured_by_auto_and_refused_by_triton(monkeypatch):
    """The kernels' backward adds each vocabulary block with atomics, in no fixed order: under
    torch.use_deterministic_algorithms(True), backend="auto" runs the chunked PyTorch path, backend="triton" is
    refused. (On CPU under the interpreter the atomics never race; the choice is what is tested.)"""
    import importlib

    from pema_triton.errors import BackendError
    from pema_triton.ops import dispatch

    kernels = importlib.import_module("pema_triton.ops.kernels")
    pytest.importorskip("triton")
    if not dispatch.uses_kernels("auto", torch.device(DEVICE)):
        pytest.skip("backend='auto' runs the reference here anyway (no Triton interpreter)")
    case = _case(97, 20, 40, 9, "random")
    expected = _fused(*case, torch.float64, "torch")

    def no_kernels(*args, **kwargs):
        raise AssertionError("the atomic kernels ran in deterministic mode")

    monkeypatch.setattr(kernels, "linear_cross_entropy", no_kernels)
    monkeypatch.setattr(kernels, "linear_cross_entropy_backward", no_kernels)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = _fused(*case, torch.float64, "auto")
        with pytest.raises(BackendError, match="use_deterministic_algorithms"):
            _fused(*case, torch.float64, "triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_fp32_products_use_tf32_only_where_the_user_allowed_it():
    """The unfused head's cuBLAS GEMM uses TF32 for fp32 inputs only after set_float32_matmul_precision("high")
    (or fp32_precision = "tf32"); the fused loss's dots follow the same setting, read at each launch."""
    import importlib

    pytest.importorskip("triton")
    launcher = importlib.import_module("pema_triton.ops.kernels.linear_cross_entropy")
    hidden = torch.zeros(4, 8)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert launcher._config(hidden, None)["PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert launcher._config(hidden, None)["PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
