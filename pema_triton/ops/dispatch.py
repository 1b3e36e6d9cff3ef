"""Which implementation runs: the Triton kernels (:mod:`pema_triton.ops.kernels`) or the PyTorch reference
(:mod:`pema_triton.ops.reference`). The only module that imports either; every op asks it.

Backends (`backend=`):
- "auto": Triton for CUDA tensors, and for CPU tensors when `TRITON_INTERPRET=1` was set before import;
  PyTorch otherwise.
- "triton": Triton or a :class:`~pema_triton.errors.BackendError`.
- "torch": the pure-PyTorch reference.
"""

from __future__ import annotations

import torch

from ..errors import BackendError
from . import reference

try:
    from . import kernels as _kernels

    HAS_TRITON = True
except ImportError:  # Triton is Linux-only; macOS and Windows users get the PyTorch path.
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")

__all__ = ["BACKENDS", "HAS_TRITON", "implementation", "kernels_or_reference", "resolve_backend", "uses_kernels"]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that runs for tensors on `device`: "triton" or "torch".

    Raises:
        BackendError: `backend="triton"` where Triton cannot run, or an unknown backend name.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    runnable = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _kernels.INTERPRET))
    if backend == "triton" and not runnable:
        why = (
            "Triton is not installed"
            if not HAS_TRITON
            else f"tensors on {device} need a CUDA device, or TRITON_INTERPRET=1 set before pema_triton is imported"
        )
        raise BackendError(f'backend="triton" cannot run here: {why}. Use backend="auto" or "torch".')
    return "triton" if runnable and backend != "torch" else "torch"


def uses_kernels(backend: str, device: torch.device) -> bool:
    return resolve_backend(backend, device) == "triton"


def implementation(backend: str, device: torch.device):
    """The module whose functions run for `backend` on `device`: :mod:`pema_triton.ops.kernels` or
    :mod:`pema_triton.ops.reference` (their functions share names and contracts)."""
    return kernels_or_reference(uses_kernels(backend, device))


def kernels_or_reference(use_kernels: bool):
    """:mod:`pema_triton.ops.kernels` where `use_kernels` (a choice already made by :func:`uses_kernels`, as the
    custom ops carry it), else :mod:`pema_triton.ops.reference`."""
    return _kernels if use_kernels else reference


