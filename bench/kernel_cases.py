"""Lookup and backward benchmarks: each pema_triton op against what a user would otherwise run, checked first.

- lookup: `compact_embedding` (remap fused into the gather; `pema` checks the ids, `pema-nocheck` does not) vs
  `F.embedding` on pre-remapped ids over the same [U, D] matrix (the upstream approach: rewrite the dataset).
- backward: the [U, D] gradient (`pema`: method "auto"; `pema-atomic`, `pema-sorted`: forced;
  `pema-sorted-<tile>`: the sorted kernel with another tile, the candidates a GPU run picks the default from) vs what
  `nn.Embedding`'s autograd runs, `aten.embedding_dense_backward`, which builds the full [V, D] gradient.

Byte floor (what must cross HBM at least, the same for every provider of a case, so GB/s ranks as time does):
- lookup: ids read (N x id bytes) + output written (N x D x e) + each distinct row read once
  (distinct x D x e) + its remap entry (distinct x 4). Rows repeated within a step can come from L2; how often
  they do is not knowable from outside, so only the first read of each is counted.
- backward: grad read (N x D x e) + ids read (N x id bytes) + the [U, D] gradient written (U x D x e). The
  baseline's own floor writes V x D x e instead; `floor ratio` = its floor / the task's floor is the speed-up
  two providers both at copy bandwidth would show.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.nn.functional as F
from harness import DEVICE, ON_GPU, Budget, Unavailable, dry_run, measure, select, skipped, triton_kernels
from ids import MissingIds, ids_for

import pema_triton
from pema_triton.ops import build_remap

LOOKUP_PROVIDERS = ["pema", "pema-nocheck", "F.embedding-remapped"]
# The sorted kernel's candidate tiles (kernels.lookup_backward.SORTED_TILES; "32x128" is `pema-sorted`'s).
SORTED_TILE_PROVIDERS = ["pema-sorted-16x128", "pema-sorted-mma32x128"]
BACKWARD_PROVIDERS = ["pema", "pema-atomic", "pema-sorted", *SORTED_TILE_PROVIDERS, "nn.Embedding-full-V"]
BASELINES = {"lookup": "F.embedding-remapped", "backward": "nn.Embedding-full-V"}
HAS_METHOD = "method" in inspect.signature(pema_triton.compact_embedding_backward).parameters


def grid() -> list[tuple]:
    """(V, ids source, D, N, dtype) in priority order: the budget drops the tail. First the goal cases (V =
    128,256, real Llama 3 ids and Zipf, N <= 64k and 1M, bf16 and fp32, D = 4096 and 768), then other vocabularies."""
    if dry_run():  # under the interpreter: a few hundred ids; fp32, as the CPU's bf16 baseline sums in bf16
        return [(30_522, "bert (MiniLM)", 32, 256, torch.float32), (30_522, "zipf", 32, 256, torch.float32)]
    if not ON_GPU:  # the CPU reference path on 2 cores
        return [(v, src, 768, 16_384, torch.float32) for v, src in
                [(30_522, "bert (MiniLM)"), (30_522, "zipf"), (128_256, "llama-3-8b"), (128_256, "zipf")]]
    goal = [(128_256, src, d, n, dt) for d, n, dt, src in itertools.product(
        [4096, 768], [4096, 16_384, 65_536, 1_048_576], [torch.bfloat16, torch.float32], ["llama-3-8b", "zipf"])]
    others = [(30_522, src, 768, n, dt) for n, dt, src in itertools.product(
        [16_384, 1_048_576], [torch.bfloat16, torch.float32], ["bert (MiniLM)", "zipf"])]
    others += [(250_002, "zipf", 768, n, dt) for n, dt in itertools.product([16_384, 1_048_576],
                                                                           [torch.bfloat16, torch.float32])]
    return goal + others


def case_name(V, source, D, N, dtype) -> str:
    src = "zipf" if source == "zipf" else "bbc-" + source.split()[0]
    return f"V{V}-{src}-D{D}-N{N}-{str(dtype).split('.')[-1]}"


def fits(V, D, N, dtype) -> bool:
    """The larger of the two phases: lookup (its reference output and one timed output, [N, D] each) and backward
    (the [N, D] gradient, the baseline's [V, D] result and its fp32 partial sums, at most [N, D] fp32)."""
    if not ON_GPU:
        return True
    need = max(2 * N * D * dtype.itemsize, N * D * dtype.itemsize + V * D * (dtype.itemsize + 4) + N * D * 4)
    return need < 0.85 * torch.cuda.get_device_properties(0).total_memory


def run(budget: Budget, rounds: int, cases: list[str] | None = None) -> list[dict]:
    """Rows of the grid's cases, or of those whose name matches one of the patterns `cases`, in their order."""
    rows = []
    for case in select(grid(), cases, case_name):
        V, source, D, N, dtype = case
        base = {"case": case_name(*case), "V": V, "D": D, "N": N, "dtype": str(dtype), "ids": source}
        if budget.spent() or not fits(V, D, N, dtype):
            why = "time budget spent" if budget.spent() else "does not fit in this device's memory"
            for op, providers in (("lookup", LOOKUP_PROVIDERS), ("backward", BACKWARD_PROVIDERS)):
                for p in providers:
                    skipped(rows, base | {"op": op, "provider": p}, why)
            continue
        try:
            ids, used, facts = ids_for(source, V, N, DEVICE)
        except MissingIds as missing:
            for op, providers in (("lookup", LOOKUP_PROVIDERS), ("backward", BACKWARD_PROVIDERS)):
                rows += [base | {"op": op, "provider": p, "status": "unavailable", "error": str(missing)}
                         for p in providers]
            continue
        base |= {"U": len(used), "distinct": int(torch.unique(ids).numel()), **facts}
        rows += [measure(base | {"op": "lookup", "provider": p},
                         lambda p=p: lookup_provider(p, ids, used, V, D, dtype),
                         floor_bytes=lookup_floor(base, ids, dtype), rounds=rounds) for p in LOOKUP_PROVIDERS]
        rows += [measure(base | {"op": "backward", "provider": p,
                                 "floor_ratio": backward_floor(base, ids, dtype, V) / backward_floor(base, ids, dtype)},
                         lambda p=p: backward_provider(p, ids, used, V, D, dtype),
                         floor_bytes=backward_floor(base, ids, dtype), rounds=rounds) for p in BACKWARD_PROVIDERS]
        del ids, used
    return rows


def lookup_floor(case: dict, ids, dtype) -> int:
    N, D, distinct = case["N"], case["D"], case["distinct"]
    return N * ids.element_size() + N * D * dtype.itemsize + distinct * (D * dtype.itemsize + 4)


def backward_floor(case: dict, ids, dtype, rows_written: int | None = None) -> int:
    N, D = case["N"], case["D"]
    return N * D * dtype.itemsize + N * ids.element_size() + (rows_written or case["U"]) * D * dtype.itemsize


def lookup_provider(provider: str, ids, used, V, D, dtype):
    """(fn, check): the provider's lookup, and its comparison with F.embedding on the remapped ids (exact)."""
    remap = build_remap(used, V)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(len(used), D, generator=gen, device=DEVICE).to(dtype)
    compact_ids = remap[ids].long()  # what a rewritten dataset holds
    expected = F.embedding(compact_ids, weight)
    fns = {
        "pema": lambda: pema_triton.compact_embedding(ids, remap, weight),
        "pema-nocheck": lambda: pema_triton.compact_embedding(ids, remap, weight, check_ids=False),
        "F.embedding-remapped": lambda: F.embedding(compact_ids, weight),
    }

    def check(out):
        if not torch.equal(out, expected):
            raise AssertionError("lookup differs from F.embedding: max |diff| "
                                 f"{(out.float() - expected.float()).abs().max():.3g}")

    return fns[provider], check


def backward_provider(provider: str, ids, used, V, D, dtype):
    """(fn, check): the provider's weight gradient, and its comparison with an fp32 index_add over the used rows."""
    if provider in ("pema-atomic", "pema-sorted") and not HAS_METHOD:
        raise Unavailable("this build's compact_embedding_backward has no method= yet")
    tile = provider.removeprefix("pema-sorted-") if provider in SORTED_TILE_PROVIDERS else None
    launcher = _sorted_tile_launcher(tile, ids, dtype) if tile else None  # before the gradient: 17 GB fp32 at 1M
    remap = build_remap(used, V)
    U = len(used)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    grad = torch.randn(len(ids), D, generator=gen, device=DEVICE).to(dtype)
    method = {"pema-atomic": {"method": "atomic"}, "pema-sorted": {"method": "sorted"}}.get(provider, {})
    fns = {
        "nn.Embedding-full-V": lambda: torch.ops.aten.embedding_dense_backward(grad, ids, V, -1, False),
        **{p: lambda: pema_triton.compact_embedding_backward(grad, ids, remap, U, **method)
           for p in ("pema", "pema-atomic", "pema-sorted")},
    }
    if tile:
        fns[provider] = lambda: launcher(grad, ids, remap, U, method="sorted", tile=tile)
    expected = torch.zeros(U, D, device=DEVICE, dtype=torch.float32).index_add_(0, remap[ids].long(), grad.float())
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-3

    def check(out):
        got = out[used] if provider == "nn.Embedding-full-V" else out
        # bf16 output: each element is rounded once from its fp32 sum (relative error 2^-8 of the sum).
        torch.testing.assert_close(got.float(), expected, atol=atol, rtol=1e-2)

    return fns[provider], check


def _sorted_tile_launcher(tile: str, ids, dtype):
    """The Triton launcher that runs the sorted kernel with the tile `tile` (the op picks no tile), or Unavailable."""
    launcher = triton_kernels(ids.device).lookup_backward
    if "tile" not in inspect.signature(launcher).parameters:
        raise Unavailable("this build's sorted backward has no tile= yet")
    if tile.startswith("mma") and dtype not in (torch.bfloat16, torch.float16):
        raise Unavailable(f"the tensor-core segment sum is for bf16/fp16 gradients, not {dtype}")
    return launcher
