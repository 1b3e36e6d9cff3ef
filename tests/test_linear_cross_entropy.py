"""Fused head + cross-entropy over compact rows (ops/linear_cross_entropy.py): the op against plain F.linear +
F.cross_entropy in fp64, the Triton row pass against the reference's on shapes that hurt, and what the chunked
design promises (no dependence on the chunk, the gradient kept from the forward, deterministic)."""

import pytest
import torch
import torch.nn.functional as F

from helpers.devices import BACKENDS, DEVICE, gpu_only
from pema_triton.errors import PemaDTypeError, PemaError
from pema_triton.ops import compact_linear_cross_entropy, dispatch, reference
from pema_triton.ops.linear_cross_entropy import default_chunk_bytes, tokens_per_chunk

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
# A few tokens per chunk: several chunks in every case (the chunk is 128-row aligned only from 128 rows up).
SMALL_CHUNKS = 7 * (130 + 33) * 8


def _case(vocab_size, num_used, dim, num_tokens, how, seed=0):
    """used ids [U], the full [V, D] head in fp64, hidden [N, D] fp64, targets [N]."""
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
    return used, full, hidden, targets


def _fused(used, full, hidden, targets, dtype, backend, **kwargs):
    """(loss, grad hidden, grad weight) of the op on a frozen head whose used rows in the buffer are stale (NaN)."""
    frozen = full.to(DEVICE, dtype, copy=True)
    frozen[used] = float("nan")  # rewritten from `weight` by the op before its GEMM
    h = hidden.to(DEVICE, dtype, copy=True).requires_grad_()
    w = full[used].to(DEVICE, dtype).requires_grad_()
    loss = compact_linear_cross_entropy(h, w, frozen, used.to(DEVICE), targets.to(DEVICE), backend=backend,
                                        **kwargs)
    loss.backward()
    assert torch.equal(frozen[used.to(DEVICE)], w.detach())  # the buffer now holds the trained rows
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("num_items", [None, 50])
@pytest.mark.parametrize("name, V, U, D, N, how", CASES, ids=CASE_IDS)
def test_equals_linear_and_cross_entropy_in_fp64(name, V, U, D, N, how, num_items):
    used, full, hidden, targets = _case(V, U, D, N, how)
    loss, grad_hidden, grad_weight = _fused(used, full, hidden, targets, torch.float64, "torch",
                                            num_items_in_batch=num_items, chunk_bytes=SMALL_CHUNKS)
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
    """The GEMMs are torch's on both backends; the row pass differs, summing the softmax in another order."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    case = _case(V, U, D, N, how)
    tri = _fused(*case, dtype, "triton", chunk_bytes=SMALL_CHUNKS)
    ref = _fused(*case, dtype, "torch", chunk_bytes=SMALL_CHUNKS)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(tri[0], ref[0], rtol=64 * acc_eps, atol=64 * acc_eps)
    # The logit gradient is rounded to `dtype` before its GEMMs: an order-dependent last bit of the softmax moves a
    # term by one ulp (the interpreter also truncates where a GPU rounds), on the rows' scale, not the result's.
    scale_eps = 64 * acc_eps if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps
    _, full, hidden, _ = case
    for got, want, rows in zip(tri[1:], ref[1:], (full, hidden)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=scale_eps * float(rows.abs().max()))


# Rows that hurt the row pass: V' over a block (1,500 > the interpreter's 1,024) and not a power of two, one token,
# every target the same, targets 0 and V' - 1, ignored rows, a target outside [0, V').
ROW_CASES = [("V1500", 1500, 5, "random"), ("N1", 300, 1, "random"), ("same", 1500, 6, "same"),
             ("ends", 1029, 4, "ends"), ("ignored-and-outside", 700, 5, "odd")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name, width, n, how", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_pass_kernel_equals_the_reference(name, width, n, how, dtype):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(n, width, generator=gen)).to(dtype)
    targets = torch.randint(0, width, (n,), generator=gen)
    targets = {"same": torch.full((n,), 7), "ends": torch.tensor([0, width - 1, 0, width - 1]),
               "odd": torch.tensor([3, -100, width, -5, width - 1])}.get(how, targets)
    scale = torch.where(targets != -100, 1 / 3, 0.0).to(torch.float64 if dtype == torch.float64 else torch.float32)
    kernels = dispatch.kernels_or_reference(True)
    for write_grad in (False, True):
        got_z, want_z = logits.to(DEVICE, copy=True), logits.to(DEVICE, copy=True)
        got = kernels.cross_entropy_rows(got_z, targets.to(DEVICE), scale.to(DEVICE), -100, write_grad)
        want = reference.cross_entropy_rows(want_z, targets.to(DEVICE), scale.to(DEVICE), -100, write_grad)
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, want, rtol=16 * eps, atol=16 * eps * 4 * width ** 0.5)
        assert torch.isfinite(got).all() and float(got[targets.to(DEVICE) == -100].abs().sum()) == 0
        if write_grad:  # the gradient in the logits' dtype, one rounding apart (two where the interpreter truncates)
            torch.testing.assert_close(got_z, want_z, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
        else:
            assert torch.equal(got_z, logits.to(DEVICE))  # untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gives_the_unfused_heads_loss_and_gradients(backend):
    """Under autocast the logits are the autocast GEMM's, rounded to bf16 as the unfused head's are before
    F.cross_entropy upcasts them: the same loss, and gradients one bf16 rounding apart."""
    used, full, hidden, targets = _case(97, 20, 40, 37, "random")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = _fused(used, full.float(), hidden.float(), targets, torch.float32, backend)
        h, w = hidden.float().to(DEVICE).requires_grad_(), full.float().to(DEVICE).requires_grad_()
        expected = F.cross_entropy(F.linear(h, w).float(), targets.to(DEVICE))
    expected.backward()
    assert loss.dtype == torch.float32 and grad_hidden.dtype == grad_weight.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-6)
    for got, want, rows in ((grad_hidden, h.grad, full), (grad_weight, w.grad[used.to(DEVICE)], hidden)):
        torch.testing.assert_close(got, want, rtol=0.01, atol=0.01 * float(rows.abs().max()) / 37)


def test_restricted_head_is_the_weight_itself_and_targets_are_its_columns():
    used, full, hidden, _ = _case(97, 20, 40, 9, "random")
    targets = torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(1))
    weight = full[used].clone().requires_grad_()
    got = compact_linear_cross_entropy(hidden, weight, None, None, targets, backend="torch")
    got.backward()
    w = full[used].clone().requires_grad_()
    expected = F.cross_entropy(hidden @ w.t(), targets)
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(weight.grad, w.grad)


def test_gradients_kept_from_the_forward_scale_with_the_upstream_gradient_and_are_skipped_without_grad(monkeypatch):
    """Under torch.no_grad() (an evaluation) the forward makes no gradient, though the inputs require one: a
    Function's `needs_input_grad` says True there."""
    from pema_triton.ops import linear_cross_entropy

    used, full, hidden, targets = _case(97, 20, 40, 37, "random")
    loss, grad_hidden, grad_weight = _fused(used, full, hidden, targets, torch.float64, "auto")
    h, w = hidden.clone().requires_grad_(), full[used].clone().requires_grad_()
    (3 * compact_linear_cross_entropy(h, w, full.clone(), used, targets)).backward()  # grad_out = 3
    torch.testing.assert_close(h.grad, 3 * grad_hidden.cpu())
    torch.testing.assert_close(w.grad, 3 * grad_weight.cpu())
    made, compute = [], linear_cross_entropy._loss_and_gradients
    monkeypatch.setattr(linear_cross_entropy, "_loss_and_gradients",
                        lambda *args: made.append(args[-2:]) or compute(*args))
    with torch.no_grad():  # no gradient to keep: the loss alone
        torch.testing.assert_close(compact_linear_cross_entropy(h, w, full.clone(), used, targets), loss.cpu())
    assert made == [(False, False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_chunk_changes_nothing_but_round_off_and_bounds_the_transient_memory(backend):
    case = _case(130, 33, 72, 300, "random")
    whole = _fused(*case, torch.float32, backend)
    chunked = _fused(*case, torch.float32, backend, chunk_bytes=SMALL_CHUNKS)
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert tokens_per_chunk(300, 130, 33, torch.float64, SMALL_CHUNKS) == 7
    chunk = tokens_per_chunk(32768, 151936, 30371, torch.bfloat16)  # the GPU goal's shape, 512 MiB (the GPU default)
    assert chunk % 128 == 0 and chunk * (151936 + 30371) * 2 <= 512 * 2**20 < (chunk + 128) * (151936 + 30371) * 2
    assert tokens_per_chunk(5, 10**9, None, torch.float32) == 1  # at least one token, whatever V is


def test_the_gpu_chunk_shrinks_to_a_quarter_of_the_free_memory(monkeypatch):
    """Read from the driver (mocked here: no GPU), without a sync; 512 MiB while there is room, never below 16."""
    cuda = torch.device("cuda", 0)
    for free, want in ((80 * 2**30, 512 * 2**20), (1 * 2**30, 256 * 2**20), (8 * 2**20, 16 * 2**20)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 141 * 2**30))
        assert default_chunk_bytes(cuda) == want
    assert default_chunk_bytes(torch.device("cpu")) == 256 * 2**20


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_runs_and_repeats_bit_for_bit(backend):
    """No atomics: the same result every run, so use_deterministic_algorithms(True) needs no other path."""
    case = _case(97, 20, 40, 37, "random")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (_fused(*case, torch.float32, backend, chunk_bytes=SMALL_CHUNKS) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what, change, error", [
    ("float targets", lambda a: a | {"targets": a["targets"].double()}, PemaDTypeError),
    ("int hidden", lambda a: a | {"hidden": a["hidden"].long()}, PemaDTypeError),
    ("weight of another width", lambda a: a | {"weight": a["weight"][:, :-1]}, PemaError),
    ("full head of another width", lambda a: a | {"full_weight": a["full_weight"][:, :-1]}, PemaError),
    ("used ids not [U]", lambda a: a | {"used_ids": a["used_ids"][:-1]}, PemaError),
    ("used ids int32", lambda a: a | {"used_ids": a["used_ids"].int()}, PemaError),
    ("used ids without the full head", lambda a: a | {"full_weight": None}, PemaError),
    ("targets not [N]", lambda a: a | {"targets": a["targets"][:-1]}, PemaError),
])
def test_bad_inputs_are_typed_errors_before_any_gemm(what, change, error, backend):
    used, full, hidden, targets = _case(97, 20, 40, 9, "random")
    args = {"hidden": hidden.float().to(DEVICE), "weight": full[used].float().to(DEVICE),
            "full_weight": full.float().to(DEVICE), "used_ids": used.to(DEVICE), "targets": targets.to(DEVICE)}
    before = args["full_weight"].clone()
    with pytest.raises(error):
        compact_linear_cross_entropy(**change(args), backend=backend)
    assert torch.equal(args["full_weight"], before)  # refused before the buffer was touched


@gpu_only
def test_half_products_add_into_fp32_on_cuda_without_falling_back():
    """The head gradient's GEMM: bf16 inputs, fp32 output added in place (torch.addmm(out_dtype=)), never run before a
    GPU session; a build without it would warn and fall back to an fp32 GEMM."""
    import warnings

    from pema_triton.ops import linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(*shape, generator=gen, device="cuda").bfloat16() for shape in ((300, 500), (500, 70)))
    acc = torch.randn(300, 70, generator=gen, device="cuda")
    want = acc.double() + a.double() @ b.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_cross_entropy.add_product_fp32(acc, a, b)
    assert linear_cross_entropy._ADDMM_OUT_DTYPE and acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)  # fp32 round-off, not bf16's 4e-3


@gpu_only
def test_row_pass_offsets_past_2_31_elements():
    """A chunk of 14,200 x 151,936 bf16 logits (2.16e9 elements, 4.3 GB): its last rows start past 2^31."""
    n, width = 14_200, 151_936
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.zeros(n, width, device="cuda", dtype=torch.bfloat16)
    tail = slice(n - 3, n)
    logits[tail] = (4 * torch.randn(3, width, generator=gen, device="cuda")).bfloat16()
    targets = torch.randint(0, width, (n,), generator=gen, device="cuda")
    scale = torch.full((n,), 1 / 3, device="cuda")
    want = logits[tail].clone()
    want_loss = reference.cross_entropy_rows(want, targets[tail], scale[tail], -100, True)
    loss = dispatch.kernels_or_reference(True).cross_entropy_rows(logits, targets, scale, -100, True)
    torch.testing.assert_close(loss[tail], want_loss, rtol=1e-5, atol=1e-4)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(logits[tail], want, rtol=2 * eps, atol=2 * eps)
