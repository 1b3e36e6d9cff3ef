"""The model inside a wrapper: what `replace_embeddings` compacts when it is given a PEFT or sentence-transformers model.

Fine-tuners hold the model they train through a wrapper: `peft.get_peft_model` returns a `PeftModel` whose
base model owns the embeddings, and a `SentenceTransformer` is an `nn.Sequential` whose first module holds the
Hugging Face transformer as `auto_model`. `replace_embeddings`, `restore_embeddings` and `get_handle` take the
wrapper or the model inside it alike: the handle lives on the inner model, where the embeddings are.

Duck-typed, so that neither package is imported (both are optional).
"""

from __future__ import annotations

import warnings

from torch import nn

from .errors import PemaWarning, UnsupportedModuleError

__all__ = ["check_embedding_wrappers", "inner_model", "is_peft_model", "is_peft_wrapped", "refuse_split_tie", "trained_module"]


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
    if _is_modules_to_save(module):
        copies = module.modules_to_save
        active = list(getattr(module, "active_adapters", ()))
        if not active or active[0] not in copies:
            raise UnsupportedModuleError(
                f"{path!r} is a PEFT modules_to_save wrapper with no active adapter copy: nothing of it trains; "
                f"activate an adapter (peft_model.set_adapter) before replace_embeddings"
            )
        return copies[active[0]]
    return module


def check_embedding_wrappers(handle, model: nn.Module, args) -> None:
    """Forward pre-hook of a compacted model: refuses a PEFT wrapper put around its compacted embedding after
    `replace_embeddings` (PEFT's `get_peft_model` after it), which would look up original ids in the [U, D] rows
    itself or train a copy that restore never merges; warns once if PEFT froze the compact rows.

    A `get_input_embeddings()` call and a few attribute reads a step."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or embedding in handle.embeddings:
        return _warn_if_peft_froze_the_rows(handle, model)
    wrapper = type(embedding).__name__
    try:
        trained = trained_module(embedding, wrapper)
    except UnsupportedModuleError as err:
        raise UnsupportedModuleError(f"{err}. It was wrapped after replace_embeddings: {_ORDER}") from None
    if trained not in handle.embeddings:
        raise UnsupportedModuleError(
            f"the compacted input embedding is inside a PEFT {wrapper} added after replace_embeddings, which trains a "
            f"copy of it that restore_embeddings cannot merge back (and splits a tied matrix): {_ORDER}"
        )


_ORDER = ("restore_embeddings(model), then get_peft_model(model, config), then replace_embeddings(peft_model, "
          "used_ids): it compacts the module PEFT trains, inside its wrapper")


def _warn_if_peft_froze_the_rows(handle, model: nn.Module) -> None:
    weight = handle.embeddings[0].weight
    if weight.requires_grad or not model.training or handle.__dict__.get("_warned_frozen"):
        return
    handle._warned_frozen = True
    if is_peft_wrapped(model):
        warnings.warn(
            "the compacted rows are frozen: peft.get_peft_model, called after replace_embeddings, froze them with "
            "every base weight, so only the adapters train. To train the used rows too: " + _ORDER,
            PemaWarning, stacklevel=3,
        )


def refuse_split_tie(model: nn.Module, holders: list[tuple[nn.Module, str]]) -> None:
    """Raises if a matrix to compact is also held by a PEFT wrapper's frozen `original_module`: `modules_to_save`
    named one side of a tied matrix, so PEFT trains a copy of that side while the other keeps the original."""
    originals = {id(wrapper.original_module): f"{path}.original_module" for path, wrapper in model.named_modules()
                 if _is_modules_to_save(wrapper)}
    frozen = [originals[id(m)] for m, _ in holders if id(m) in originals]
    if frozen:
        raise UnsupportedModuleError(
            f"PEFT's modules_to_save names one side of a tied matrix: {frozen[0]!r} (a frozen original) still holds "
            f"the matrix the other side trains a copy of, which unties them. Name both sides (the embedding and "
            f"lm_head) with ensure_weight_tying=True for one tied copy, or neither"
        )


def _is_modules_to_save(module: nn.Module) -> bool:
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module")
