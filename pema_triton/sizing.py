"""What PEMA would save before anything is loaded: training-state bytes of a model's shape in each mode.

The model is built on the meta device (no memory) and compacted there by `replace_embeddings` itself, so the
figures count exactly what the library keeps (a `frozen` head's [V, D] buffer included), not a formula beside it.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .errors import PemaError, PemaWarning
from .replace import replace_embeddings

__all__ = ["MODES", "OPTIMIZER_STATE", "estimate"]

# Mode name -> replace_embeddings keywords (None: the uncompacted model, full fine-tuning).
MODES = {
    "full": None,
    "frozen": {"output": "frozen"},
    "restricted": {"output": "restricted"},
    "fused frozen": {"output": "frozen", "fused_loss": True},
    "fused restricted": {"output": "restricted", "fused_loss": True},
}
# Optimizer -> bytes of state per trainable element, as a multiple of the parameter's element size (AdamW: two
# moments) or in bytes ("8bit": bitsandbytes' two uint8 moments; their per-block absmax is left out, 1/256 of that).
OPTIMIZER_STATE = {"adamw": (2, 0), "adam": (2, 0), "sgd": (0, 0), "sgd_momentum": (1, 0), "lion": (1, 0),
                   "adamw_8bit": (0, 2)}


def estimate(model_or_config, used_ids, *, optimizer: str = "adamw", dtype: torch.dtype | None = None,
             tokens_per_step: int | None = None) -> dict[str, dict[str, int]]:
    """Training-state bytes of `model_or_config`'s shape for each mode of :data:`MODES`.

    Args:
        model_or_config: a Hugging Face model or config (its shape is rebuilt on the meta device: nothing loads).
        used_ids: the ids the data uses (a scan's result).
        optimizer: a key of :data:`OPTIMIZER_STATE`.
        dtype: the training dtype (default: the model's, or fp32 for a config).
        tokens_per_step: N, to count the [N, V] (or [N, U]) fp32 logits a step holds (none when fused).

    Returns:
        {mode: {"weights", "gradients", "optimizer", "logits", "total"}} in bytes, every trainable parameter
        trained (embeddings included). A model without an output embedding (an encoder) has "full" and "frozen"
        (its input compacted) only.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise PemaError(f"optimizer must be one of {sorted(OPTIMIZER_STATE)}, got {optimizer!r}")
    meta = _meta_model(model_or_config, dtype)
    result = {}
    for mode, options in MODES.items():
        if options is not None and meta.get_output_embeddings() is None and options != MODES["frozen"]:
            continue  # no head (an encoder): the full model and its input compacted ("frozen" does just that)
        model = copy.deepcopy(meta)
        if options is not None:
            with warnings.catch_warnings():  # used ids without the special ones: the user's to judge, not a size's
                warnings.simplefilter("ignore", PemaWarning)
                replace_embeddings(model, used_ids, offload=None, **options)
        result[mode] = _bytes(model, optimizer, tokens_per_step, options)
    return result


def _meta_model(model_or_config, dtype) -> nn.Module:
    """The model's class (or the config's first architecture, else a causal LM) built on the meta device."""
    import transformers

    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, transformers.PretrainedConfig):
        raise PemaError(f"estimate needs a Hugging Face model or config, got {type(model_or_config).__name__}")
    if isinstance(model_or_config, nn.Module):
        cls = type(model_or_config)
        dtype = dtype or next((p.dtype for p in model_or_config.parameters() if p.is_floating_point()), None)
    else:
        cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype).train()
        return cls._from_config(copy.deepcopy(config), dtype=dtype).train()


def _bytes(model: nn.Module, optimizer: str, tokens_per_step: int | None, options) -> dict[str, int]:
    trainable = [p for p in model.parameters() if p.requires_grad]  # parameters() counts a tied matrix once
    per_element, fixed = OPTIMIZER_STATE[optimizer]
    sizes = {
        "weights": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": sum(p.numel() * (per_element * p.element_size() + fixed) for p in trainable),
    }
    logits = 0
    head = model.get_output_embeddings()
    if tokens_per_step and head is not None and not (options or {}).get("fused_loss"):
        logits = tokens_per_step * head.out_features * 4
    sizes["logits"] = logits
    sizes["total"] = sum(sizes.values())
    return sizes
