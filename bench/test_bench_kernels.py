"""Kernel benchmarks: each pema_triton op against what a user would otherwise run, checked equal first.

- lookup: `compact_embedding` (remap fused into the gather) vs `F.embedding` on pre-remapped ids over the U-row
  table (the upstream approach after rewriting the dataset).
- backward: the [U, D] scatter vs the full-vocabulary `nn.Embedding` backward (a [V, D] gradient).
- forward+backward: `CompactEmbedding` vs `nn.Embedding` over V rows.
- scan: `scan_ids` into a byte map, then the sorted used ids read out of it, vs `torch.unique` and
  `torch.bincount` (+ nonzero); on CPU also the upstream approach's numpy `bincount` through `datasets.map`.

GPU cases use the Triton kernels and skip without a GPU; CPU cases run the PyTorch reference path (the CPU
path users get). `python bench/run.py` runs them and writes ratios and GB/s against the device's peak.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, run_benchmark

import pema_triton
from pema_triton.remap import build_remap
from pema_triton.vocab import used_ids_from_byte_map

FULL = os.environ.get("PEMA_BENCH_GRID", "default") == "full"
if ON_GPU:
    VOCABS = [30_522, 128_256, 250_002]
    DIMS = [768, 4096]
    TOKENS = [16_384, 262_144, 1_048_576] if FULL else [16_384, 1_048_576]
    SHARES = [0.05, 0.30]
    DTYPES = [torch.float32, torch.bfloat16]
else:  # the CPU reference path on 2 cores: realistic vocabularies, a small batch
    VOCABS = [30_522, 128_256]
    DIMS = [768]
    TOKENS = [16_384]
    SHARES = [0.05, 0.30]
    DTYPES = [torch.float32]

CASES = [
    c for c in itertools.product(VOCABS, DIMS, TOKENS, SHARES, DTYPES)
    # Skip what cannot fit: a 1M x 4096 fp32 output, its gradient and a 250k x 4096 fp32 gradient are 37 GB.
    if not ON_GPU or 3 * c[2] * c[1] * c[4].itemsize + c[0] * c[1] * 4 < 0.7 * torch.cuda.get_device_properties(0).total_memory
]


def case_id(c):
    V, D, N, share, dtype = c
    return f"V{V}-D{D}-N{N}-U{int(share * 100)}pct-{str(dtype).split('.')[-1]}"


def make(V, D, N, share, dtype):
    gen = torch.Generator().manual_seed(0)
    used = torch.randperm(V, generator=gen)[: int(share * V)].sort().values
    # Zipf-like token frequencies over the used ids, as in real text.
    ranks = (torch.rand(N, generator=gen) ** 3 * len(used)).long()
    ids = used[ranks].to(DEVICE)
    used = used.to(DEVICE)
    remap = build_remap(used, V)
    weight = torch.randn(len(used), D, device=DEVICE).to(dtype)
    return used, remap, ids, weight


def _bytes_lookup(N, D, dtype, ids):
    return N * ids.element_size() + N * 4 + 2 * N * D * dtype.itemsize  # ids, remap entries, rows read, out


@pytest.mark.parametrize("provider", ["pema", "pema-nocheck", "F.embedding-remapped"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lookup(benchmark, peak, case, provider):
    V, D, N, share, dtype = case
    used, remap, ids, weight = make(*case)
    compact_ids = remap[ids].long()  # what a rewritten dataset holds
    fns = {
        "pema": lambda: pema_triton.compact_embedding(ids, remap, weight),
        "pema-nocheck": lambda: pema_triton.compact_embedding(ids, remap, weight, check_ids=False),
        "F.embedding-remapped": lambda: F.embedding(compact_ids, weight),
    }
    assert torch.equal(fns[provider](), F.embedding(compact_ids, weight))
    nbytes = _bytes_lookup(N, D, dtype, ids) - (N * 4 if provider == "F.embedding-remapped" else 0)
    run_benchmark(benchmark, fns[provider], info={"op": "lookup", "case": case_id(case), "provider": provider,
                                                  "baseline": "F.embedding-remapped"}, peak=peak, bytes_moved=nbytes)


@pytest.mark.parametrize("provider", ["pema", "pema-deterministic", "nn.Embedding-full-V"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward(benchmark, peak, case, provider):
    V, D, N, share, dtype = case
    used, remap, ids, weight = make(*case)
    grad = torch.randn(N, D, device=DEVICE).to(dtype)
    U = len(used)
    fns = {
        "pema": lambda: pema_triton.compact_embedding_backward(grad, ids, remap, U),
        "pema-deterministic": lambda: pema_triton.compact_embedding_backward(grad, ids, remap, U, deterministic=True),
        # What nn.Embedding's autograd runs: a dense [V, D] gradient from all N ids.
        "nn.Embedding-full-V": lambda: torch.ops.aten.embedding_dense_backward(grad, ids, V, -1, False),
    }
    out = fns[provider]()
    ref = torch.zeros(U, D, device=DEVICE, dtype=torch.float32).index_add_(0, remap[ids].long(), grad.float())
    got = out[used] if provider == "nn.Embedding-full-V" else out
    torch.testing.assert_close(got.float(), ref, atol=1e-2 if dtype == torch.bfloat16 else 1e-3, rtol=1e-2)
    rows = V if provider == "nn.Embedding-full-V" else U
    nbytes = N * D * dtype.itemsize + N * ids.element_size() + rows * D * dtype.itemsize
    run_benchmark(benchmark, fns[provider], info={"op": "backward", "case": case_id(case), "provider": provider,
                                                  "baseline": "nn.Embedding-full-V"}, peak=peak, bytes_moved=nbytes)


@pytest.mark.parametrize("provider", ["pema", "nn.Embedding-full-V"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(benchmark, peak, case, provider):
    V, D, N, share, dtype = case
    used, remap, ids, weight = make(*case)
    full = torch.nn.Embedding(V, D, device=DEVICE, dtype=dtype)
    module = pema_triton.CompactEmbedding(full, used) if provider == "pema" else full
    grad = torch.randn(N, D, device=DEVICE).to(dtype)

    def step():
        module.weight.grad = None
        out = module(ids)
        out.backward(grad)
        return out

    # Checked first: the same output as the full table, and the used rows of the full table's gradient.
    expected_grad = torch.zeros(V, D, device=DEVICE).index_add_(0, ids, grad.float())[used]
    assert torch.equal(step(), F.embedding(ids, full.weight))
    got_grad = module.weight.grad[used] if provider != "pema" else module.weight.grad
    torch.testing.assert_close(got_grad.float(), expected_grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-3,
                               rtol=1e-2)
    nbytes = _bytes_lookup(N, D, dtype, ids) + N * D * dtype.itemsize + module.weight.numel() * dtype.itemsize
    run_benchmark(benchmark, step, info={"op": "forward+backward", "case": case_id(case), "provider": provider,
                                         "baseline": "nn.Embedding-full-V"}, peak=peak, bytes_moved=nbytes)


SCAN_CASES = [(V, N) for V in (30_522, 128_256, 250_002, 1_000_000) for N in ([1_048_576, 16_777_216] if ON_GPU
                                                                               else [1_048_576])]


@pytest.mark.parametrize(
    "provider",
    ["pema", "pema-map-only", "pema-packed-bits", "torch.unique", "torch.bincount", "numpy-bincount-datasets.map"],
)
@pytest.mark.parametrize("V, N", SCAN_CASES, ids=[f"V{v}-N{n}" for v, n in SCAN_CASES])
def test_scan(benchmark, peak, V, N, provider):
    """Every provider but `pema-map-only` returns the sorted used ids, as `torch.unique` does: the same work.

    `pema-map-only` marks the byte map only, what each further chunk of a streamed dataset costs (the ids are
    read out of the map once, at the end). `pema-packed-bits` is the layout not chosen (one bit per id, atomic OR),
    timed beside the byte map so the choice rests on a measurement.
    """
    if provider == "numpy-bincount-datasets.map" and (ON_GPU or V > 250_002):
        pytest.skip("the upstream approach runs on the CPU, once per realistic vocabulary")
    if provider == "pema-packed-bits" and not ON_GPU:
        pytest.skip("the packed-bit layout exists as a Triton kernel only: GPU benchmark")
    gen = torch.Generator().manual_seed(0)
    ids = (torch.rand(N, generator=gen) ** 3 * V).long().clamp_(max=V - 1).to(DEVICE)
    expected = torch.unique(ids)
    byte_map = torch.zeros(V, dtype=torch.uint8, device=DEVICE)

    def mark():
        byte_map.zero_()
        pema_triton.scan_ids(ids, byte_map)
        return byte_map

    fns = {
        "pema": lambda: used_ids_from_byte_map(mark()),
        "pema-map-only": mark,
        "torch.unique": lambda: torch.unique(ids),
        "torch.bincount": lambda: torch.nonzero(torch.bincount(ids, minlength=V)).flatten(),
    }
    if provider == "numpy-bincount-datasets.map":
        fns[provider] = _upstream_scan(ids.cpu(), V)
    if provider == "pema-packed-bits":
        from pema_triton.kernels import mark_ids_packed, used_ids_from_packed

        words = torch.zeros((V + 31) // 32, dtype=torch.int32, device=DEVICE)

        def packed():
            words.zero_()
            mark_ids_packed(ids, words, V)
            return used_ids_from_packed(words, V)

        fns[provider] = packed
    out = fns[provider]()
    found = torch.nonzero(out).flatten() if provider == "pema-map-only" else torch.as_tensor(out).to(DEVICE)
    assert torch.equal(found, expected)
    run_benchmark(benchmark, fns[provider], info={"op": "scan", "case": f"V{V}-N{N}", "provider": provider,
                                                  "baseline": "torch.unique"}, peak=peak,
                  bytes_moved=N * ids.element_size() + V)


def _upstream_scan(ids, V, row=512):
    """The reference implementation's counting: numpy bincount per batch through `datasets.map`."""
    datasets = pytest.importorskip("datasets")
    import numpy as np

    rows = ids[: len(ids) // row * row].view(-1, row).numpy()
    dataset = datasets.Dataset.from_dict({"input_ids": rows})

    def count():
        counts = np.zeros(V, dtype=np.int64)

        def add(batch):
            counts[:] += np.bincount(np.concatenate(batch["input_ids"]), minlength=V)
            return {}

        dataset.map(add, batched=True, batch_size=1000, load_from_cache_file=False, keep_in_memory=True)
        return np.flatnonzero(counts)

    return count
