"""Input checks shared by the Triton launchers and the PyTorch reference, so both reject the same input."""

from __future__ import annotations

import torch

from .errors import IdOutOfRangeError, PemaDTypeError, PemaError, UnusedIdError, UsedIdsError, format_ids

ID_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_ids(ids: torch.Tensor, name: str = "ids") -> None:
    if ids.dtype not in ID_DTYPES:
        raise PemaDTypeError(
            f"{name} must be int32 or int64 token ids, got {ids.dtype}; tokenizers return int64 ids, "
            f"so a float here usually means the wrong tensor was passed"
        )


def check_remap(remap: torch.Tensor, device: torch.device) -> None:
    if remap.dtype != torch.int32 or remap.dim() != 1:
        raise PemaDTypeError(
            f"remap must be a 1-D int32 table of length V, got {remap.dtype} of shape {tuple(remap.shape)}"
        )
    if remap.device != device:
        raise PemaError(f"remap is on {remap.device} but the ids are on {device}; move both to one device")


def check_float(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in WEIGHT_DTYPES:
        raise PemaDTypeError(f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    check_float(weight, name)
    if weight.dim() != 2:
        raise PemaError(f"{name} must be 2-D [U, D], got shape {tuple(weight.shape)}")


def check_lookup_inputs(ids: torch.Tensor, remap: torch.Tensor, weight: torch.Tensor) -> None:
    """Checks `ids`, `remap` [V] and `weight` [U, D] for a compact lookup."""
    check_ids(ids)
    check_weight(weight)
    check_remap(remap, ids.device)
    if weight.device != ids.device:
        raise PemaError(f"weight is on {weight.device} but the ids are on {ids.device}; move both to one device")


def check_scatter_inputs(grad_out: torch.Tensor, ids: torch.Tensor, remap: torch.Tensor, num_rows: int) -> None:
    """Checks `grad_out` [*ids.shape, D], `ids`, `remap` [V] for the backward scatter into `num_rows` rows."""
    check_ids(ids)
    check_remap(remap, ids.device)
    check_float(grad_out, "grad_out")
    if tuple(grad_out.shape[:-1]) != tuple(ids.shape):
        raise PemaError(f"grad_out has shape {tuple(grad_out.shape)}, expected {tuple(ids.shape)} + (D,)")
    if num_rows < 1:
        raise PemaError(f"num_rows must be at least 1, got {num_rows}")


def raise_for_bad_ids(ids: torch.Tensor, remap: torch.Tensor, what: str = "token ids") -> None:
    """Raises the typed error naming every id of `ids` that has no compact row; returns if there is none.

    Called only after a kernel reported bad ids, so the extra pass costs nothing on the good path.
    """
    flat = ids.reshape(-1).long()
    vocab_size = remap.numel()
    outside = flat[(flat < 0) | (flat >= vocab_size)]
    if outside.numel():
        bad = torch.unique(outside).tolist()
        raise IdOutOfRangeError(
            f"{what} {format_ids(bad)} are outside the vocabulary [0, {vocab_size}); "
            f"check that the tokenizer matches the model",
            bad,
        )
    unused = flat[remap[flat] < 0]
    if unused.numel():
        bad = torch.unique(unused).tolist()
        raise UnusedIdError(
            f"{what} {format_ids(bad)} are not in the used vocabulary the compacted model holds "
            f"(U={int((remap >= 0).sum())} of V={vocab_size}); scan every split the model will see, "
            f"or pass these ids in `keep`",
            bad,
        )


def check_scan_state(ids: torch.Tensor, bitmap: torch.Tensor, counts: torch.Tensor | None) -> None:
    """Checks `ids` and the streaming scan state: `bitmap` [V] uint8 and `counts` [V] int64 (or None)."""
    check_ids(ids)
    if bitmap.dtype != torch.uint8 or bitmap.dim() != 1 or not bitmap.is_contiguous():
        raise PemaDTypeError(
            f"bitmap must be a contiguous 1-D uint8 tensor of length V, got {bitmap.dtype} {tuple(bitmap.shape)}"
        )
    if bitmap.device != ids.device:
        raise PemaError(f"bitmap is on {bitmap.device} but the ids are on {ids.device}; move both to one device")
    if counts is not None and (
        counts.dtype != torch.int64 or counts.shape != bitmap.shape or counts.device != bitmap.device
        or not counts.is_contiguous()
    ):
        raise PemaDTypeError(
            f"counts must be a contiguous int64 tensor shaped like bitmap {tuple(bitmap.shape)} on {bitmap.device}, "
            f"got {counts.dtype} {tuple(counts.shape)} on {counts.device}"
        )


def check_used_ids(used_ids, vocab_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Validates `used_ids` (a tensor or sequence) as sorted, unique ids in [0, V); returns them as int64.

    Raises:
        UsedIdsError: not integers, not 1-D, empty, unsorted, duplicated or outside [0, `vocab_size`).
    """
    # Validated where the caller keeps them (usually the CPU: no device syncs), then moved to `device`.
    ids = torch.as_tensor(used_ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UsedIdsError(f"used_ids must be integer token ids, got {ids.dtype}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise UsedIdsError(f"used_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    ids = ids.long()
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        raise UsedIdsError(
            f"used_ids {format_ids(outside.tolist())} are outside the vocabulary [0, {vocab_size})"
        )
    steps = ids[1:] - ids[:-1]
    if bool((steps == 0).any()):
        dup = torch.unique(ids[1:][steps == 0]).tolist()
        raise UsedIdsError(f"used_ids must be unique; {format_ids(dup)} appear more than once (use torch.unique)")
    if bool((steps < 0).any()):
        raise UsedIdsError("used_ids must be sorted ascending (torch.unique returns them sorted)")
    return ids.to(device) if device is not None else ids
