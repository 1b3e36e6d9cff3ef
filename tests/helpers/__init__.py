"""Helpers the tests share: devices and backends, kernel test cases, tiny models, real assets.

Importing this package turns the Triton interpreter on where there is no GPU: TRITON_INTERPRET must be set before
pema_triton (and so its @triton.jit kernels) is imported, and conftest.py imports this package first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
