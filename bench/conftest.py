"""Benchmark fixtures: the device, its memory-bandwidth peak, and honest timing (results checked, synced)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark: needs a CUDA device")

# Nominal DRAM bandwidth of common training GPUs (vendor datasheets), GB/s.
_GPU_PEAK_GBPS = {
    "H200": 4800, "H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L4": 300, "T4": 320, "A10G": 600,
}


def _measured_copy_gbps() -> float:
    """What this machine copies, GB/s (read + write of a 256 MiB tensor): the CPU's practical peak."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    import time

    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def device_peak() -> tuple[str, float, str]:
    """(device name, peak GB/s, where the peak comes from)."""
    if ON_GPU:
        name = torch.cuda.get_device_name()
        for key, gbps in _GPU_PEAK_GBPS.items():
            if key in name:
                return name, gbps, "datasheet"
        return name, float("nan"), "unknown"
    return f"cpu x{os.cpu_count()}", _measured_copy_gbps(), "measured copy"


@pytest.fixture(scope="session")
def peak():
    return device_peak()


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def run_benchmark(benchmark, fn, *, info: dict, peak, bytes_moved: int, rounds: int | None = None):
    """Times `fn` (device-synchronised inside the timed call, after two warm-up calls) and records GB/s."""

    def timed():
        out = fn()
        sync()
        return out

    name, gbps, source = peak
    benchmark.extra_info.update(info | {"bytes": bytes_moved, "device": name, "peak_gbps": gbps,
                                        "peak_source": source})
    rounds = rounds or (20 if ON_GPU else 3)
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
