"""Where the tests run: CUDA where there is one, else the CPU with Triton under the interpreter."""

import pytest
import torch

import pema_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Backends every op test compares: the reference always, Triton where it can run (GPU, or the interpreter).
BACKENDS = ["torch"] + (["triton"] if pema_triton.resolve_backend("auto", DEVICE) == "triton" else [])



def gpu_only(test):
    """Marks a test `gpu` (so `pytest -m gpu` and `scripts/gpu.sh tests` select it) and skips it without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")(test))
