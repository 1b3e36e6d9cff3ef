"""pytest-benchmark front end of the kernel and scan benchmarks, for runs kept with pytest-benchmark's tooling:

    pytest bench/test_bench_kernels.py --benchmark-json=kernels.benchmark.json
    pytest bench/test_bench_kernels.py --benchmark-compare      # against an earlier saved run

The cases, providers and result checks are those of `scripts/gpu.sh kernels` / `scan` (bench/kernel_cases.py,
bench/scan_cases.py): each provider's result is checked against the reference before it is timed. The statistics
pytest-benchmark keeps are host-clock rounds, each one synchronised and (on CUDA) after an L2 flush in its setup,
so they include the launch; each benchmark's `extra_info` also holds the CUDA-event median and worst round of
`triton.testing.do_bench` (what the tables report; `perf_counter` on a CPU), the byte floor and its GB/s.
"""

from __future__ import annotations

import kernel_cases
import pytest
import scan_cases
import torch
from harness import DEVICE, ON_GPU, Unavailable, time_fn
from ids import MissingIds, ids_for

_L2_FLUSH = torch.empty(64 * 2**20, dtype=torch.int32, device=DEVICE) if ON_GPU else None  # 256 MB > any L2


def _flush_l2():
    if ON_GPU:
        _L2_FLUSH.zero_()
        torch.cuda.synchronize()


def _run(benchmark, make_fn, info: dict, floor_bytes: int):
    """Checks the provider's result, then times it with pytest-benchmark and records do_bench's figures."""
    try:
        fn, check = make_fn()
    except Unavailable as why:
        pytest.skip(str(why))
    check(fn())

    def synced():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(info, floor_bytes=floor_bytes, device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    if not benchmark.disabled:
        timing = time_fn(fn)
        benchmark.extra_info.update(timer="do_bench: CUDA events, L2 flushed" if ON_GPU else "perf_counter",
                                    timer_median_s=timing.median_s, timer_worst_s=timing.worst_s,
                                    gbps_median=floor_bytes / timing.median_s / 1e9)
    benchmark.pedantic(synced, setup=_flush_l2, rounds=20 if ON_GPU else 3, iterations=1, warmup_rounds=1)


def _ids(source, V, N):
    try:
        return ids_for(source, V, N, DEVICE)
    except MissingIds as missing:
        pytest.skip(str(missing))


KERNEL_CASES = [c for c in kernel_cases.grid() if kernel_cases.fits(*[c[i] for i in (0, 2, 3, 4)])]


@pytest.mark.parametrize("provider", kernel_cases.LOOKUP_PROVIDERS + kernel_cases.BACKWARD_PROVIDERS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: kernel_cases.case_name(*c))
def test_kernel(benchmark, case, provider):
    V, source, D, N, dtype = case
    ids, used, _ = _ids(source, V, N)
    info = {"case": kernel_cases.case_name(*case), "provider": provider, "U": len(used)}
    row = {"N": N, "D": D, "U": len(used), "distinct": int(torch.unique(ids).numel())}
    if provider in kernel_cases.LOOKUP_PROVIDERS:
        _run(benchmark, lambda: kernel_cases.lookup_provider(provider, ids, used, V, D, dtype),
             info | {"op": "lookup", "baseline": kernel_cases.BASELINES["lookup"]},
             kernel_cases.lookup_floor(row, ids, dtype))
    else:
        _run(benchmark, lambda: kernel_cases.backward_provider(provider, ids, used, V, D, dtype),
             info | {"op": "backward", "baseline": kernel_cases.BASELINES["backward"]},
             kernel_cases.backward_floor(row, ids, dtype))


@pytest.mark.parametrize("provider", scan_cases.PROVIDERS)
@pytest.mark.parametrize("case", scan_cases.grid(), ids=lambda c: scan_cases.case_name(*c))
def test_scan(benchmark, case, provider):
    V, source, N, dtype = case
    ids = _ids(source, V, N)[0].to(dtype)
    expected = torch.unique(ids)
    _run(benchmark, lambda: scan_cases.scan_provider(provider, ids, V, expected),
         {"op": "scan", "case": scan_cases.case_name(*case), "provider": provider,
          "baseline": scan_cases.BASELINES["scan"]}, N * ids.element_size() + len(expected) * 8)
