"""Input checks, dtype rules and result types shared by the Triton launchers and the PyTorch reference, so both
reject the same input, accumulate in the same precision and return the same record."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import PemaDTypeError, PemaError
from .remap import check_remap

ID_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class LogProbRows(NamedTuple):
    """`log_prob_rows`' per-token statistics of `logits / T` ([n] each): fp32 (fp64 for fp64), `argmax` int64; and
    the [n, V'] logit gradient in the logits' dtype (the logits' own memory for the kernel)."""

    log_probs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    argmax: torch.Tensor | None
    grad: torch.Tensor | None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients accumulate in float32 whatever the weight dtype (float64 stays float64): a bf16 sum of k
    repeated ids loses the low bits of every term once k passes 2**8."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_id_dtype(ids: torch.Tensor, name: str = "ids") -> None:
    if ids.dtype not in ID_DTYPES:
        raise PemaDTypeError(
            f"{name} must be int32 or int64 token ids, got {ids.dtype}; tokenizers return int64 ids, "
            f"so a float here usually means the wrong tensor was passed"
        )


def check_float(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in WEIGHT_DTYPES:
        raise PemaDTypeError(f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")


def check_same_device(tensor: torch.Tensor, name: str, ids: torch.Tensor) -> None:
    if tensor.device != ids.device:
        raise PemaError(f"{name} is on {tensor.device} but the ids are on {ids.device}; move both to one device")


def check_lookup_inputs(ids: torch.Tensor, remap: torch.Tensor, weight: torch.Tensor) -> None:
    """Checks `ids`, `remap` [V] and `weight` [U, D] for a compact lookup."""
    check_id_dtype(ids)
    check_float(weight, "weight")
    if weight.dim() != 2:
        raise PemaError(f"weight must be 2-D [U, D], got shape {tuple(weight.shape)}")
    check_remap(remap, ids.device)
    check_same_device(weight, "weight", ids)


def check_scatter_inputs(grad_out: torch.Tensor, ids: torch.Tensor, remap: torch.Tensor, num_rows: int) -> None:
    """Checks `grad_out` [*ids.shape, D], `ids`, `remap` [V] for the backward scatter into `num_rows` rows."""
    check_id_dtype(ids)
    check_remap(remap, ids.device)
    check_float(grad_out, "grad_out")
    if tuple(grad_out.shape[:-1]) != tuple(ids.shape):
        raise PemaError(f"grad_out has shape {tuple(grad_out.shape)}, expected {tuple(ids.shape)} + (D,)")
    if num_rows < 1:
        raise PemaError(f"num_rows must be at least 1, got {num_rows}")


def check_scan_state(ids: torch.Tensor, byte_map: torch.Tensor, counts: torch.Tensor | None) -> None:
    """Checks `ids` and the streaming scan state: `byte_map` [V] uint8 and `counts` [V] int64 (or None)."""
    check_id_dtype(ids)
    if byte_map.dtype != torch.uint8 or byte_map.dim() != 1 or not byte_map.is_contiguous():
        raise PemaDTypeError(
            f"byte_map must be a contiguous 1-D uint8 tensor of length V, got {byte_map.dtype} "
            f"{tuple(byte_map.shape)}"
        )
    check_same_device(byte_map, "byte_map", ids)
    if counts is not None and (
        counts.dtype != torch.int64 or counts.shape != byte_map.shape or counts.device != byte_map.device
        or not counts.is_contiguous()
    ):
        raise PemaDTypeError(
            f"counts must be a contiguous int64 tensor shaped like byte_map {tuple(byte_map.shape)} on "
            f"{byte_map.device}, got {counts.dtype} {tuple(counts.shape)} on {counts.device}"
        )


def check_linear_cross_entropy_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, full_weight: torch.Tensor | None, used_ids: torch.Tensor | None,
    targets: torch.Tensor,
) -> None:
    """Checks `hidden` [N, D], `weight` [U, D], `full_weight` [V, D] with `used_ids` [U] (or both None: `weight`
    is the whole head) and `targets` [N] for the fused head + loss and the per-token log-probs."""
    check_id_dtype(targets, "targets")
    if (full_weight is None) != (used_ids is None):
        raise PemaError("pass full_weight and used_ids together (a frozen head), or neither (weight is the head)")
    named = ((hidden, "hidden"), (weight, "weight"), (full_weight, "full_weight"))
    for tensor, name in ((t, n) for t, n in named if t is not None):
        check_float(tensor, name)
        if tensor.dim() != 2:
            raise PemaError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
        check_same_device(tensor, name, targets)
    dim, num_used = hidden.shape[1], weight.shape[0]
    if weight.shape[1] != dim or (full_weight is not None and full_weight.shape[1] != dim):
        raise PemaError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and full_weight "
                        f"{None if full_weight is None else tuple(full_weight.shape)} must share their width D")
    if used_ids is not None:
        check_same_device(used_ids, "used_ids", targets)
        if used_ids.dtype != torch.int64 or tuple(used_ids.shape) != (num_used,):
            raise PemaError(f"used_ids must be int64 [U] = [{num_used}] (weight's rows), got {used_ids.dtype} "
                            f"{tuple(used_ids.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise PemaError(f"targets must be [N] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
