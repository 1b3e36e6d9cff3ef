"""Compact lookup and its backward scatter: Triton against the PyTorch reference on shapes that hurt."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import pema_triton
from helpers.cases import CASE_IDS, CASES, make_case, scatter_tolerance, tiered_grid
from helpers.devices import BACKENDS, DEVICE, ON_GPU, gpu_only
from pema_triton.errors import BackendError, IdOutOfRangeError, PemaDTypeError, PemaError, UnusedIdError
from pema_triton.ops import reference

pytestmark = pytest.mark.usefixtures("nan_empty")

# bf16 atomics are not needed (the scatter accumulates in fp32), so bf16 runs under the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ID_DTYPES = [torch.int32, torch.int64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, V, U, D, shape, how", CASES, ids=CASE_IDS)
def test_lookup_matches_full_embedding(name, V, U, D, shape, how, dtype, id_dtype, backend):
    used, remap, ids = make_case(V, U, shape, how, id_dtype, DEVICE)
    full = torch.randn(V, D, device=DEVICE).to(dtype)
    weight = full[used]

    tri = pema_triton.compact_embedding(ids, remap, weight, backend=backend)
    ref = F.embedding(ids.long(), full)

    assert tri.shape == (*shape, D) and tri.dtype == dtype
    assert torch.equal(tri, ref)  # a gather: exact, and NaN-free only if every element was written


# 128 combinations, ~135 s under the interpreter: the fast tier runs each case with both methods and one rotating
# dtype / id dtype (16), `make test-all` the rest.
@pytest.mark.parametrize("name, V, U, D, shape, how, dtype, id_dtype, method", tiered_grid(
    CASES, CASE_IDS, {"dtype": DTYPES, "id_dtype": ID_DTYPES, "method": ["atomic", "sorted"]}, every=("method",)))
def test_backward_triton_matches_reference(name, V, U, D, shape, how, dtype, id_dtype, method):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    used, remap, ids = make_case(V, U, shape, how, id_dtype, DEVICE)
    grad_out = torch.randn(*shape, D, device=DEVICE).to(dtype)
    padding_row = U // 2 if name == "D97" else -1

    ref = reference.lookup_backward(grad_out, ids, remap, U, padding_row)
    tri = pema_triton.compact_embedding_backward(
        grad_out, ids, remap, U, padding_row=padding_row, backend="triton", method=method
    )

    assert tri.shape == (U, D) and tri.dtype == dtype
    torch.testing.assert_close(tri, ref, **scatter_tolerance(grad_out, ids, dtype))
    if padding_row >= 0:
        assert torch.all(tri[padding_row] == 0)
    if method == "sorted" and ON_GPU:  # the interpreter runs programs one by one: any order repeats there
        again = pema_triton.compact_embedding_backward(
            grad_out, ids, remap, U, padding_row=padding_row, backend="triton", method="sorted"
        )
        assert torch.equal(tri, again)


# Sorted ids cut into chunks (kernels.lookup_backward.sorted_blocks: 128 under the interpreter): rows that cross chunk
# boundaries, one row spanning many chunks (the fix-up's loop runs more than once), -1 rows (unused ids, the
# padding row) sorting first, and a chunk that is one row from end to end.
SORTED_CASES = [
    ("hot-row", 400, 50, 12, 700, 0.6, -1),
    ("all-one-row", 60, 9, 5, 1100, 1.0, -1),
    ("hot-padding-row", 400, 50, 7, 500, 0.5, 50 // 3),
    ("many-rows", 3000, 900, 3, 1500, 0.0, 4),
]


@pytest.mark.parametrize("name, V, U, D, N, hot, padding_row, dtype", tiered_grid(
    SORTED_CASES, [c[0] for c in SORTED_CASES], {"dtype": [torch.float32, torch.bfloat16]}))
def test_sorted_backward_splits_rows_across_chunks(name, V, U, D, N, hot, padding_row, dtype):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    used, remap, _ = make_case(V, U, (1,), "random", torch.int64, DEVICE)
    gen = torch.Generator().manual_seed(1)
    picks = torch.randint(0, U, (N,), generator=gen)
    picks[torch.rand(N, generator=gen) < hot] = U // 3
    ids = used.cpu()[picks].to(DEVICE)
    grad_out = torch.randn(N, D, generator=gen).to(device=DEVICE, dtype=dtype)

    ref = reference.lookup_backward(grad_out, ids, remap, U, padding_row)
    tri = pema_triton.compact_embedding_backward(grad_out, ids, remap, U, padding_row=padding_row,
                                                 backend="triton", method="sorted")

    torch.testing.assert_close(tri, ref, **scatter_tolerance(grad_out, ids, dtype))
    if padding_row >= 0:
        assert torch.all(tri[padding_row] == 0)


def _candidate_case(dtype):
    """A hot row crossing several 64-token chunks and D = 136 in two column blocks of 128 (the second ragged):
    (grad_out [260, 136], ids, remap) for U = 50. The tests pass padding row 7, which sorts first as -1 (as an id
    with no row would)."""
    used, remap, _ = make_case(400, 50, (1,), "random", torch.int64, DEVICE)
    gen = torch.Generator().manual_seed(2)
    picks = torch.randint(0, 50, (260,), generator=gen)
    picks[torch.rand(260, generator=gen) < 0.6] = 50 // 3
    return torch.randn(260, 136, generator=gen).to(device=DEVICE, dtype=dtype), used.cpu()[picks].to(DEVICE), remap


# The tiles a GPU run times beside the shipped one (kernels.lookup_backward.SORTED_TILES, bench's
# pema-sorted-<tile>). fp16 runs the MMA's half-precision dot itself under the interpreter (bf16 there runs it in fp32:
# the interpreter's bf16 dot is garbage).
@pytest.mark.parametrize("tile, dtype, launched", [("16x128", torch.bfloat16, (4, 16, 128, False)),
                                                   ("mma32x128", torch.bfloat16, (2, 32, 128, True)),
                                                   ("mma32x128", torch.float16, (2, 32, 128, True))])
def test_the_sorted_backwards_candidate_tiles_equal_the_reference(monkeypatch, tile, dtype, launched):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    kernels = importlib.import_module("pema_triton.ops.kernels.lookup_backward")
    blocks, sorted_blocks = [], kernels.sorted_blocks
    monkeypatch.setattr(kernels, "sorted_blocks", lambda *args: blocks.append(sorted_blocks(*args)) or blocks[-1])
    grad_out, ids, remap = _candidate_case(dtype)

    tri = kernels.lookup_backward(grad_out, ids, remap, 50, 7, method="sorted", tile=tile)

    assert [(b["TILES"], b["BLOCK_T"], b["BLOCK_D"], b["MMA"]) for b in blocks] == [launched]
    torch.testing.assert_close(tri, reference.lookup_backward(grad_out, ids, remap, 50, 7),
                               **scatter_tolerance(grad_out, ids, dtype))
    assert torch.all(tri[7] == 0)
    with pytest.raises(ValueError, match="tile must be one of"):
        kernels.lookup_backward(grad_out, ids, remap, 50, method="sorted", tile="8x8")
    with pytest.raises(ValueError, match="sorted method"):
        kernels.lookup_backward(grad_out, ids, remap, 50, method="atomic", tile=tile)
    if launched[3]:  # an fp32 dot would round the gradients to TF32
        with pytest.raises(ValueError, match="bf16/fp16 gradients only"):
            kernels.lookup_backward(grad_out.float(), ids, remap, 50, method="sorted", tile=tile)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's 0 x inf
@pytest.mark.parametrize("tile, dtype", [pytest.param("32x128", torch.bfloat16, marks=pytest.mark.slow),
                                         pytest.param("16x128", torch.bfloat16, marks=pytest.mark.slow),
                                         ("mma32x128", torch.bfloat16), ("mma32x128", torch.float16)])
def test_the_sorted_backwards_tiles_keep_a_non_finite_gradient_in_its_own_row(tile, dtype):
    # An overflow's inf or NaN goes to its row only, as in the reference (a GradScaler reads the rest). The MMA's
    # mask product alone would spread it (0 x inf is NaN) to every segment of its tile and column: such a tile is
    # redone (kernels.lookup_backward._nonfinite_segment_sums). A lone +inf and -inf, both in one (hot, chunk-
    # crossing) row, and a NaN in the ragged second column block. The scans' tiles (IEEE by construction, 6-7 s
    # each under the interpreter) are in the slow tier.
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    from pema_triton.ops.kernels import lookup_backward

    grad_out, ids, remap = _candidate_case(dtype)
    tolerance = scatter_tolerance(grad_out, ids, dtype)  # of the finite values
    hot = (ids == ids.mode().values).nonzero().flatten()
    grad_out[3, 0], grad_out[10, 7] = float("inf"), -float("inf")
    grad_out[hot[0], 5], grad_out[hot[-1], 5], grad_out[40, 130] = float("inf"), -float("inf"), float("nan")
    ref = reference.lookup_backward(grad_out, ids, remap, 50)

    tri = lookup_backward(grad_out, ids, remap, 50, method="sorted", tile=tile)

    assert 4 <= int((~ref.isfinite()).sum()) <= 5  # tokens 3, 10 and 40 may share a row
    torch.testing.assert_close(tri, ref, equal_nan=True, **tolerance)


@pytest.mark.parametrize("name, V, U, D, shape, how", CASES, ids=CASE_IDS)
def test_reference_backward_equals_used_rows_of_full_gradient(name, V, U, D, shape, how):
    used, remap, ids = make_case(V, U, shape, how, torch.int64, DEVICE)
    full = torch.randn(V, D, device=DEVICE, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(*shape, D, device=DEVICE, dtype=torch.float64)
    F.embedding(ids, full).backward(grad_out)

    ref = reference.lookup_backward(grad_out, ids, remap, U)

    torch.testing.assert_close(ref, full.grad[used])
    unused = torch.ones(V, dtype=torch.bool, device=DEVICE)
    unused[used] = False
    assert torch.all(full.grad[unused] == 0)  # what makes PEMA exact on the input side


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_gradient_equals_reference(dtype, backend):
    used, remap, ids = make_case(300, 37, (4, 33), "random", torch.int64, DEVICE)
    weight = torch.randn(37, 97, device=DEVICE).to(dtype).requires_grad_()
    grad_out = torch.randn(4, 33, 97, device=DEVICE).to(dtype)

    pema_triton.compact_embedding(ids, remap, weight, backend=backend).backward(grad_out)

    ref = reference.lookup_backward(grad_out, ids, remap, 37)
    torch.testing.assert_close(weight.grad, ref, **scatter_tolerance(grad_out, ids, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["atomic", pytest.param("sorted", marks=pytest.mark.slow)])  # sorted: ~25 s
def test_gradcheck_float64(backend, method):
    used, remap, ids = make_case(60, 11, (3, 7), "random", torch.int64, DEVICE)
    ids[0, :3] = used[4]  # a repeated row, so accumulation is exercised
    weight = torch.randn(11, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)

    def fn(w):
        return pema_triton.compact_embedding(ids, remap, w, backend=backend, method=method)

    assert torch.autograd.gradcheck(fn, (weight,))


def test_backward_method_follows_dtype_and_deterministic_algorithms(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    from pema_triton.ops import kernels

    seen = []
    real = kernels.lookup_backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(kernels, "lookup_backward", spy)
    used, remap, ids = make_case(60, 11, (3, 7), "random", torch.int64, DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(11, 5, device=DEVICE, dtype=dtype, requires_grad=True)
        pema_triton.compact_embedding(ids, remap, weight, backend="triton").sum().backward()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        pema_triton.compact_embedding(ids, remap, weight.detach().float().requires_grad_(),
                                      backend="triton").sum().backward()
        with pytest.raises(BackendError, match="not deterministic"):
            pema_triton.compact_embedding_backward(torch.ones(3, 7, 5, device=DEVICE), ids, remap, 11,
                                                   method="atomic")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == ["atomic", "sorted", "sorted"]  # fp32: atomic; bf16: sorted; deterministic: sorted
    with pytest.raises(BackendError, match="method must be one of"):
        pema_triton.compact_embedding_backward(torch.ones(3, 7, 5, device=DEVICE), ids, remap, 11, method="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_raise_typed_errors_naming_them(backend):
    used, remap, ids = make_case(100, 10, (2, 5), "random", torch.int64, DEVICE)
    weight = torch.randn(10, 8, device=DEVICE)
    unused = next(i for i in range(100) if i not in used.tolist())

    with pytest.raises(IdOutOfRangeError, match=r"\[-3, 100\].*outside the vocabulary \[0, 100\)") as err:
        pema_triton.compact_embedding(torch.tensor([used[0], 100, -3], device=DEVICE), remap, weight, backend=backend)
    assert err.value.ids == [-3, 100]
    with pytest.raises(UnusedIdError, match=rf"\[{unused}\].*not in the used vocabulary") as err:
        pema_triton.compact_embedding(torch.tensor([[unused]], device=DEVICE), remap, weight, backend=backend)
    assert err.value.ids == [unused]
    with pytest.raises(PemaDTypeError, match="int32 or int64"):
        pema_triton.compact_embedding(ids.float(), remap, weight, backend=backend)
    with pytest.raises(PemaDTypeError, match="remap must be a 1-D int32"):
        pema_triton.compact_embedding(ids, remap.long(), weight, backend=backend)
    with pytest.raises(PemaDTypeError, match="weight must be float"):
        pema_triton.compact_embedding(ids, remap, weight.long(), backend=backend)
    # check_ids=False trades the check for no host sync: bad ids embed to zeros and never read out of bounds.
    out = pema_triton.compact_embedding(
        torch.tensor([100, unused], device=DEVICE), remap, weight, backend=backend, check_ids=False
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_triton_backend_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    if not pema_triton.HAS_TRITON:
        with pytest.raises(BackendError, match="not installed"):
            pema_triton.resolve_backend("triton", torch.device("cpu"))
        return
    monkeypatch.setattr(pema_triton.ops.dispatch._kernels, "INTERPRET", False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        pema_triton.resolve_backend("triton", torch.device("cpu"))
    assert pema_triton.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(BackendError, match="backend must be one of"):
        pema_triton.resolve_backend("cuda", torch.device("cpu"))
    assert isinstance(BackendError("x"), PemaError)


@gpu_only
@pytest.mark.parametrize("method", ["atomic", "sorted"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_offsets_past_2_31_elements(dtype, method):
    """N * D > 2**31: int32 offsets would wrap; 2**19 tokens x D=4160 = 2.18e9 elements (4.4 GB in bf16)."""
    V, U, D, N = 4096, 1024, 4160, 1 << 19
    used, remap, _ = make_case(V, U, (1,), "random", torch.int64, DEVICE)
    weight = torch.randn(U, D, device=DEVICE).to(dtype)
    ids = used[torch.randint(0, U, (N,), device=DEVICE)]
    ids[-1] = used[-1]
    out = pema_triton.compact_embedding(ids, remap, weight, backend="triton")
    assert N * D > 2**31
    assert torch.equal(out[-1], weight[-1]) and torch.equal(out[N // 2], weight[remap[ids[N // 2]].long()])
    del out
    grad = torch.ones(N, D, device=DEVICE, dtype=dtype)
    tri = pema_triton.compact_embedding_backward(grad, ids, remap, U, backend="triton", method=method)
    counts = torch.bincount(remap[ids].long(), minlength=U).to(torch.float32)
    torch.testing.assert_close(tri[:, -1].float(), counts.to(dtype).float())




@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_trace_under_torch_compile(backend):
    """The ops' fake impls and registered autograd let AOTAutograd trace forward and backward.

    AOTAutograd decomposes a triton_op into its kernel launch, which the interpreter cannot run on traced
    tensors; on CPU the Triton path is therefore captured by Dynamo alone ("eager"), checking the fake impl.
    """
    torch._dynamo.reset()
    used, remap, ids = make_case(300, 37, (4, 33), "random", torch.int64, DEVICE)
    weight = torch.randn(37, 97, device=DEVICE, requires_grad=True)

    def step(w):
        return (pema_triton.compact_embedding(ids, remap, w, backend=backend, check_ids=False) ** 2).sum()

    compile_backend = "eager" if backend == "triton" and not ON_GPU else "aot_eager"
    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    (grad_compiled,) = torch.autograd.grad(compiled(weight), weight)
    (grad_eager,) = torch.autograd.grad(step(weight), weight)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a CUDA device beside the current one (2 GPUs)")
@pytest.mark.parametrize("method", ["atomic", "sorted"])
def test_kernels_launch_on_their_tensors_device_not_the_current_one(method):
    """Triton launches on the current device: tensors on cuda:1 with cuda:0 current (a model spread over GPUs in
    one process, `device_map="auto"`) need the launchers' device guard."""
    device = torch.device("cuda", 1)
    used, remap, ids = make_case(300, 37, (4, 33), "random", torch.int64, device)
    weight = torch.randn(37, 97, device=device, requires_grad=True)
    grad_out = torch.randn(4, 33, 97, device=device)
    with torch.cuda.device(0):
        out = pema_triton.compact_embedding(ids, remap, weight, backend="triton", method=method)
        out.backward(grad_out)
        byte_map = torch.zeros(300, dtype=torch.uint8, device=device)
        pema_triton.scan_ids(ids, byte_map, backend="triton")
    assert torch.equal(out, F.embedding(remap[ids].long(), weight))
    torch.testing.assert_close(weight.grad, reference.lookup_backward(grad_out, ids, remap, 37),
                               **scatter_tolerance(grad_out, ids, torch.float32))
    assert torch.equal(torch.nonzero(byte_map).flatten(), torch.unique(ids))
