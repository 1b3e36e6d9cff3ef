"""The model inside a wrapper: what `replace_embeddings` compacts when given a PEFT or sentence-transformers model.

Fine-tuners hold the model they train through a wrapper: `peft.get_peft_model` returns a `PeftModel` whose
base model owns the embeddings, and a `SentenceTransformer` is an `nn.Sequential` whose first module holds the
Hugging Face transformer as `auto_model`. `replace_embeddings`, `restore_embeddings` and `get_handle` take the
wrapper or the model inside it alike: the handle lives on the inner model, where the embeddings are.

Duck-typed, so that neither package is imported (both are optional).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .distributed import warn_on_main_process
from .errors import PemaError, PemaWarning, UnsupportedModuleError

__all__ = [
    "adopt_peft_model", "check_embedding_wrappers", "inner_model", "is_peft_model", "is_peft_wrapped",
    "original_rows_without_adapters", "peft_model_in", "route_peft_saves", "trained_module",
]


def is_peft_model(model: nn.Module) -> bool:
    """A `peft.PeftModel` (or subclass): it has a PEFT config and a base model."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def peft_model_in(model: nn.Module) -> nn.Module | None:
    """The PeftModel `model` is, or that a SentenceTransformer holds as its transformer (its rows were left frozen,
    without a warning, when only a PeftModel given directly was looked for); else None."""
    if is_peft_model(model):
        return model
    inner = _sentence_transformer_model(model)
    return peft_model_in(inner) if inner is not None else None


def _sentence_transformer_model(model: nn.Module) -> nn.Module | None:
    """The Hugging Face model of a SentenceTransformer's first module (`Transformer.auto_model`), else None."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    inner = getattr(model[0], "auto_model", None)
    return inner if isinstance(inner, nn.Module) else None


def inner_model(model: nn.Module) -> nn.Module:
    """The model whose embeddings `replace_embeddings` compacts: a PeftModel's base model (the transformers model
    with LoRA layers in it), a SentenceTransformer's transformer (also when it is itself a PeftModel), the module a
    DistributedDataParallel (or FSDP1) wrapper holds, or `model`."""
    if type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel") and hasattr(model, "module"):
        return inner_model(model.module)
    if is_peft_model(model):
        return inner_model(model.get_base_model())
    inner = _sentence_transformer_model(model)
    return inner_model(inner) if inner is not None else model


def is_peft_wrapped(model: nn.Module) -> bool:
    """Whether PEFT has been applied to `model` (LoRA or other tuner layers, modules_to_save wrappers in it)."""
    return is_peft_model(model) or any(type(m).__module__.partition(".")[0] == "peft" for m in model.modules())


def trained_module(model: nn.Module, module: nn.Module, path: str, restricted: bool = False) -> nn.Module:
    """The module of `model` that trains in place of `module` (at `path`): the active copy of a PEFT
    `modules_to_save` wrapper, which PEFT trains while its `original_module` stays frozen, else `module` itself.

    Raises:
        UnsupportedModuleError: `module` is PEFT's `trainable_token_indices` wrapper, which trains a delta of chosen
            rows over the full matrix (the compaction's job, in a form it cannot compose with), or a PEFT tuner
            layer; a modules_to_save copy that splits a tied matrix; a `restricted` head that is a copy.
    """
    trained = _unwrapped(module, path)
    if isinstance(getattr(trained, "weight", None), nn.Parameter):
        _refuse_split_tie(model, trained)
    if restricted and trained is not module:
        raise UnsupportedModuleError(
            f"{path!r} is a PEFT modules_to_save wrapper: with output='restricted' its compact copy gives U logit "
            f"columns, but under peft_model.disable_adapter() (the reference pass of DPO / KTO) the wrapper calls "
            f"its original and gives V; use output='frozen' (the full-vocabulary logits either way)"
        )
    return trained


def _unwrapped(module: nn.Module, path: str) -> nn.Module:
    if hasattr(module, "base_layer") and type(module).__module__.partition(".")[0] == "peft":
        raise UnsupportedModuleError(
            f"{path!r} is a PEFT {type(module).__name__} tuner layer (LoRA or similar on the embedding or head, "
            f"from target_modules): it adapts the full [V, D] matrix. Leave it out of target_modules; compacted, "
            f"the used rows of the matrix itself train"
        )
    if hasattr(module, "token_adapter") and hasattr(module, "original_module"):
        indices = sorted({int(i) for ids in getattr(module.token_adapter, "token_indices", {}).values() for i in ids})
        raise UnsupportedModuleError(
            f"{path!r} is PEFT's TrainableTokensWrapper (trainable_token_indices): it trains a delta of chosen rows "
            f"of the full [V, D] matrix, the job the compaction does. Build the PEFT model without "
            f"trainable_token_indices and call replace_embeddings(peft_model, used_ids, "
            f"trainable_ids={indices if len(indices) <= 8 else '[...]'}): the same rows train, as [T, D] rows"
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
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # as replace_embeddings' own lookup: nothing to check then
        embedding = None
    if embedding is None or embedding in handle.embeddings:
        return _warn_if_peft_froze_the_rows(handle, model)
    wrapper = type(embedding).__name__
    try:
        trained = _unwrapped(embedding, wrapper)
    except UnsupportedModuleError as err:
        raise UnsupportedModuleError(f"{err}. It was wrapped after replace_embeddings: {_ORDER}") from None
    copies = embedding.modules_to_save.values() if _is_modules_to_save(embedding) else ()
    if trained not in handle.embeddings and any(m in handle.embeddings for m in copies):
        raise UnsupportedModuleError(
            "the active PEFT adapter's modules_to_save copy of the input embedding is not the compacted one: another "
            "adapter's copy was compacted (set_adapter switched after replace_embeddings). Switch back, or "
            "restore_embeddings, set_adapter, then replace_embeddings again"
        )
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
        warn_on_main_process(
            "the compacted rows are frozen: peft.get_peft_model, called after replace_embeddings, froze them with "
            "every base weight, so only the adapters train. To train the used rows too: pass PemaCallback to the "
            "Trainer (it makes them trainable again before the optimizer is built), or " + _ORDER,
            PemaWarning, stacklevel=3,
        )


def _refuse_split_tie(model: nn.Module, module: nn.Module) -> None:
    """Raises if `module` (an embedding or head to compact) is one side of a tied matrix that PEFT's
    `modules_to_save` split: a copy trains on one side while a module on the other side still holds the original
    (GPT-2's lm_head beside a `wte` copy, T5's encoder and decoder beside a `shared` copy, which they never call)."""
    wrappers = {id(w.original_module): (path, w) for path, w in model.named_modules() if _is_modules_to_save(w)}
    copy_of = next(((path, w) for path, w in wrappers.values() if module in w.modules_to_save.values()), None)
    matrices = [module.weight] + ([copy_of[1].original_module.weight] if copy_of is not None else [])
    for matrix in matrices:
        holders = {id(m): m for m in model.modules() if any(p is matrix for p in m._parameters.values())}
        inside = [wrappers[i][0] for i in holders if i in wrappers]  # frozen originals holding it
        outside = [m for i, m in holders.items() if i not in wrappers and not _is_copy(m, wrappers)]
        if inside and (outside or matrix is module.weight):
            raise UnsupportedModuleError(
                f"PEFT's modules_to_save names one side of a tied matrix: {inside[0]}.original_module (frozen) and "
                f"a module outside it share the matrix that a copy now trains on one side only, which unties them. "
                f"Name every side (the embedding and lm_head) with ensure_weight_tying=True for one tied copy, or "
                f"none"
            )


def _is_copy(module: nn.Module, wrappers: dict) -> bool:
    return any(module in w.modules_to_save.values() for _, w in wrappers.values())


def _is_modules_to_save(module: nn.Module) -> bool:
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module")


def adopt_peft_model(handle, peft_model: nn.Module) -> None:
    """What a PeftModel around a just-compacted model needs: the compact rows trainable (PEFT froze them with
    every base weight), its saves routed, the original rows under `disable_adapter()`."""
    route_peft_saves(peft_model, embedding_layers=handle.train_compact_rows() > 0)
    original_rows_without_adapters(handle, peft_model)


def route_peft_saves(peft_model: nn.Module, embedding_layers: bool) -> None:
    """Makes `peft_model.save_pretrained` save what a compacted PeftModel needs (an instance attribute, set once).

    - While compacted it also writes `pema_compaction.json`, as a plain model's `save_pretrained` does: a Trainer
      checkpoint of the PeftModel records which rows its optimizer state belongs to.
    - With `embedding_layers` (replace_embeddings trained the used rows of the base model's matrices, which PEFT's
      adapter save leaves out) `save_embedding_layers` defaults to True: reloaded onto a fresh base, an adapter
      lost them. This lasts beyond restore, where those rows sit in the base matrices; an explicit
      `save_embedding_layers=` still decides.
    """
    save = peft_model.__dict__.get("save_pretrained")
    if not isinstance(save, _PeftSave):
        save = peft_model.__dict__["save_pretrained"] = _PeftSave(peft_model)
    save.embedding_layers |= embedding_layers


class _PeftSave:
    def __init__(self, peft_model: nn.Module):
        self.peft_model, self.embedding_layers = peft_model, False

    def __call__(self, save_directory, *args, **kwargs):
        from .handle import get_handle  # here: handle.py imports this module

        if self.embedding_layers:
            kwargs.setdefault("save_embedding_layers", True)
        result = type(self.peft_model).save_pretrained(self.peft_model, save_directory, *args, **kwargs)
        handle = get_handle(self.peft_model)
        if handle is not None and kwargs.get("is_main_process", True):
            handle.save_compaction(save_directory)
        return result


def original_rows_without_adapters(handle, peft_model: nn.Module) -> None:
    """Makes `peft_model.disable_adapter()` give the base model the PeftModel was built on, the compact rows
    included: DPO's and KTO's reference pass when `ref_model` is None. PEFT's adapters hold no embedding rows, so
    the rows replace_embeddings trains would otherwise reach the reference, which would drift with the policy."""
    if "disable_adapter" in peft_model.__dict__:
        return
    handle.patch(peft_model, "disable_adapter", _DisableAdapter(handle, peft_model.disable_adapter))


class _DisableAdapter:
    def __init__(self, handle, disable_adapter):
        self.handle, self.disable_adapter = handle, disable_adapter

    @contextmanager
    def __call__(self):
        with self.disable_adapter(), _original_compact_rows(self.handle):
            yield


@contextmanager
def _original_compact_rows(handle):
    """Within the block the compact Parameters hold the original rows (from the kept full matrices)."""
    swapped = []
    for kept, compact in handle.kept_and_compact():
        if kept is None or compact is None or not compact.requires_grad:
            continue  # untrained rows are the original ones already; a tied head's weight is the embedding's
        if torch.is_grad_enabled():
            raise PemaError("a forward with the adapters disabled (a reference pass) reads the original embedding "
                            "rows in place of the trained ones; run it under torch.no_grad(), as TRL does")
        used = handle.compaction.used_ids.to(kept.param.device)
        original = kept.param.detach().index_select(0, used).to(compact.device, compact.dtype)
        swapped.append((compact, compact.data))
        compact.data = original
    try:
        yield
    finally:
        for compact, trained in swapped:
            compact.data = trained
        # A `frozen` head's [V, D] buffer holds the rows of its last forward, and a backward still to come (the
        # policy's, after DPO's reference pass) recomputes its logits from it: the trained rows go back in.
        for head in handle.heads:
            head.refreshed_frozen_rows()
