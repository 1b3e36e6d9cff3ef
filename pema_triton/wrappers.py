"""The model inside a wrapper: what `replace_embeddings` compacts when it is given a PEFT or sentence-transformers model.

Fine-tuners hold the model they train through a wrapper: `peft.get_peft_model` returns a `PeftModel` whose
base model owns the embeddings, and a `SentenceTransformer` is an `nn.Sequential` whose first module holds the
Hugging Face transformer as `auto_model`. `replace_embeddings`, `restore_embeddings` and `get_handle` take the
wrapper or the model inside it alike: the handle lives on the inner model, where the embeddings are.

Duck-typed, so that neither package is imported (both are optional).
"""

from __future__ import annotations

from torch import nn

from .errors import UnsupportedModuleError

__all__ = ["inner_model", "is_peft_model", "is_peft_wrapped", "trained_module"]


def is_peft_model(model: nn.Module) -> bool:
    """A `peft.PeftModel` (or subclass): it has a PEFT config and a base model."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _sentence_transformer_model(model: nn.Module) -> nn.Module | None:
    """The Hugging Face model of a SentenceTransformer's first module (`Transformer.auto_model`), else None."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    inner = getattr(model[0], "auto_model", None)
    return inner if isinstance(inner, nn.Module) else None


def inner_model(model: nn.Module) -> nn.Module:
    """The model whose embeddings `replace_embeddings` compacts: a PeftModel's base model (the transformers model
    with LoRA layers in it), a SentenceTransformer's transformer (also when it is itself a PeftModel), or `model`."""
    if is_peft_model(model):
        return inner_model(model.get_base_model())
    inner = _sentence_transformer_model(model)
    return inner_model(inner) if inner is not None else model


def is_peft_wrapped(model: nn.Module) -> bool:
    """Whether PEFT has been applied to `model` (LoRA or other tuner layers, modules_to_save wrappers in it)."""
    return is_peft_model(model) or any(type(m).__module__.partition(".")[0] == "peft" for m in model.modules())


def trained_module(module: nn.Module, path: str) -> nn.Module:
    """The module that trains in place of `module` (at `path`): the active copy of a PEFT `modules_to_save` wrapper,
    which PEFT trains while its `original_module` stays frozen, else `module` itself.

    Raises:
        UnsupportedModuleError: `module` is PEFT's `trainable_token_indices` wrapper, which trains a delta of chosen
            rows over the full matrix: the same job as the compaction, in a form it cannot compose with.
    """
    if hasattr(module, "token_adapter") and hasattr(module, "original_module"):
        raise UnsupportedModuleError(
            f"{path!r} is PEFT's TrainableTokensWrapper (trainable_token_indices): it trains a delta of chosen rows "
            f"of the full [V, D] matrix, the job the compaction does. Use one of the two: leave "
            f"trainable_token_indices out of the PEFT config (the compacted rows train, all of them), or keep it "
            f"and do not call replace_embeddings"
        )
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module"):
        active = list(getattr(module, "active_adapters", ()))
        if not active or active[0] not in copies:
            raise UnsupportedModuleError(
                f"{path!r} is a PEFT modules_to_save wrapper with no active adapter copy: nothing of it trains; "
                f"activate an adapter (peft_model.set_adapter) before replace_embeddings"
            )
        return copies[active[0]]
    return module
