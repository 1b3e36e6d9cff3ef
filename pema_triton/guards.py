"""Guards against misuse that would otherwise train silently wrong: each turns it into a typed error.

- An optimizer holding a Parameter that no longer trains: the full [V, D] matrix `replace_embeddings` took out of
  the model (an optimizer built before it), or the compact rows of a model since restored (an optimizer reused
  after it, e.g. by a second `trainer.train()`).
- Optimizer state of another compaction: a checkpoint's Adam moments are [U, D] rows of one set of used ids. Each
  optimizer holding compact rows records the compaction's fingerprint in its saved param groups; state loaded
  into rows of another compaction (or into the full matrix, or full-vocabulary state into compact rows) is
  refused. Stepping it would apply other rows' moments, or (fused Adam) read past the end of a tensor.
- A copy of a compacted module used in its place: PEFT's `modules_to_save`, applied after `replace_embeddings`,
  deep-copies the embedding and head and trains the copies, which restore never merges, and splits a tied matrix
  in two (applied before, `replace_embeddings` compacts the copy itself: :mod:`pema_triton.wrappers`). Modules that
  `replace_embeddings` converted are registered; a compact module that was converted but is not registered
  (a copy of one) refuses to run. Copying the whole model (EMA) copies its handle, which registers the copies.
- A model whose full-vocabulary logits come out U columns wide: its forward reads the compacted matrix directly
  instead of calling the head module.
- Changing a compacted model's vocabulary or embedding modules: `resize_token_embeddings` would resize the
  compact [U, D] matrix as if it were the full [V, D] one (and set `config.vocab_size` from U), and
  `set_input_embeddings` / `set_output_embeddings` would put in a module that restore never merges into; the
  trained rows could no longer be merged back. Each refuses while the model is compacted.

A global optimizer step pre-hook checks the first two before any weight moves: a loop over the optimizer's
parameters, an attribute read each, plus a shape check of the (two or three) compact rows' state.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import AlreadyCompactedError, PemaError

__all__ = [
    "check_full_vocabulary_logits", "check_managed", "mark_compacted", "mark_stale", "refuse_vocabulary_changes",
    "register_managed", "release_managed", "unmark_stale",
]

# Methods of a Hugging Face model that change its vocabulary or swap its embedding modules.
_VOCABULARY_CHANGES = ("resize_token_embeddings", "set_input_embeddings", "set_output_embeddings")

_STALE = "_pema_stale"  # attribute on a Parameter that must not be stepped: why, as the error message
_COMPACTION = "_pema_compaction"  # attribute on a compact Parameter: its compaction's fingerprint
# Key of a saved param group: {str(position in the group): fingerprint}. String keys, as a JSON or
# torch.distributed.checkpoint round trip makes them: DCP loads a checkpoint's record over the one in the state
# dict it loads into (the resumed model's own) only where the keys are equal, and an int key would survive it.
_RECORD = "pema_compactions"
_RECORDING = "_pema_recording"  # attribute on an optimizer whose state_dict records fingerprints


_MANAGED = "_pema_managed"  # attribute on a module replace_embeddings converted (copied along with the module)
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> each managed module that may run


_MARKS = "_pema_marks"  # attribute on a managed module: {Parameter name: fingerprint} of its compact Parameters


def register_managed(module) -> None:
    setattr(module, _MANAGED, True)
    # A deep copy of the model may register a module before its own state is copied in (the handle is reached
    # first): it has no Parameters yet, and its copied ones carry their fingerprints with them.
    params = module.__dict__.get("_parameters") or {}
    setattr(module, _MARKS, {name: getattr(p, _COMPACTION) for name, p in params.items() if hasattr(p, _COMPACTION)})
    _LIVE[id(module)] = module


def _mark_replaced_parameters() -> None:
    """Marks the compact Parameters a wrapper put in place of the marked ones: FSDP2's `fully_shard` replaces
    each with a sharded DTensor Parameter of its own, which the optimizer then holds. A few modules per step."""
    for module in list(_LIVE.values()):
        for name, fingerprint in module.__dict__.get(_MARKS, {}).items():
            param = module._parameters.get(name)
            if param is not None and getattr(param, _COMPACTION, None) != fingerprint:
                mark_compacted(param, fingerprint)


def release_managed(module) -> None:
    module.__dict__.pop(_MANAGED, None)
    module.__dict__.pop(_MARKS, None)
    if _LIVE.get(id(module)) is module:
        del _LIVE[id(module)]


def check_managed(module) -> None:
    """Raises if `module` is a copy of a module replace_embeddings converted, rather than that module."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the weak-dictionary lookup (4 graph breaks a forward); a copy compiled in its place
        # still meets the model's wrapper check (wrappers.check_embedding_wrappers) and this one when run eagerly.
        return
    if module.__dict__.get(_MANAGED) and _LIVE.get(id(module)) is not module:
        raise PemaError(
            f"this {type(module).__name__} is a copy of a module that replace_embeddings compacted (PEFT's "
            f"modules_to_save makes such copies): it would train rows that restore_embeddings never merges back, and "
            f"split a tied matrix. With PEFT, compact after get_peft_model: replace_embeddings(peft_model, used_ids) "
            f"compacts the modules_to_save copy inside its wrapper"
        )


def mark_stale(param: torch.Tensor | None, why: str) -> None:
    """Refuse optimizer steps over `param` from now on, saying `why`."""
    if param is not None:
        setattr(param, _STALE, why)


def mark_compacted(param: torch.Tensor | None, fingerprint: tuple[int, int, int]) -> None:
    """`param` holds the rows of the compaction with this fingerprint (see `Compaction.fingerprint`)."""
    if param is not None:
        setattr(param, _COMPACTION, fingerprint)


def unmark_stale(param: torch.Tensor | None) -> None:
    if param is not None and hasattr(param, _STALE):
        delattr(param, _STALE)


def _check_optimizer_step(optimizer, args, kwargs):
    name = type(optimizer).__name__
    _mark_replaced_parameters()
    for group in optimizer.param_groups:
        recorded = group.get(_RECORD)  # present once a state dict written under a compaction was loaded
        for position, param in enumerate(group["params"]):
            why = getattr(param, _STALE, None)
            if why is not None:
                raise PemaError(f"{name}.step() over a parameter that does not train: {why}")
            mine = getattr(param, _COMPACTION, None)
            theirs = recorded.get(str(position), recorded.get(position)) if recorded is not None else None
            if recorded is not None and mine != (tuple(theirs) if theirs is not None else None):
                raise PemaError(f"{name}.step() with optimizer state of another compaction: {_describe(theirs, mine)}")
            if mine is not None:
                _check_state_shapes(optimizer, param, name)
                if not getattr(optimizer, _RECORDING, False):
                    optimizer.register_state_dict_post_hook(_record_compactions)
                    setattr(optimizer, _RECORDING, True)
        group.pop(_RECORD, None)  # checked: later state dicts record the parameters as they are then
    return None


def _check_state_shapes(optimizer, param, name: str) -> None:
    """State of the full [V, ...] matrix on [U, ...] compact rows (loaded from an uncompacted model's checkpoint).

    Only a tensor with V leading rows where the parameter has U is that: optimizers keep state of other shapes
    (Adafactor's factored [U] / [D] second moments, 8-bit optimizers' quantization blocks, LBFGS's flat history).
    """
    vocab_size, num_used, _ = getattr(param, _COMPACTION)
    for key, value in optimizer.state.get(param, {}).items():
        if (torch.is_tensor(value) and value.dim() and vocab_size != num_used and value.shape[0] == vocab_size
                and tuple(value.shape[1:]) == tuple(param.shape[1:value.dim()])):
            raise PemaError(
                f"{name}.step() with state {key!r} of shape {tuple(value.shape)} for compact rows of shape "
                f"{tuple(param.shape)}: the optimizer state was loaded from a checkpoint of an uncompacted model; "
                f"resume the uncompacted model, or start the optimizer afresh"
            )


def _describe(theirs, mine) -> str:
    def what(fingerprint):
        if fingerprint is None:
            return "the full, uncompacted matrix"
        vocab_size, num_used, crc = fingerprint
        return f"a compaction of {num_used:,} of {vocab_size:,} ids (checksum {crc:08x})"

    return (f"it was saved for {what(theirs)}, but this parameter is {what(mine)}. Resume on a model compacted "
            f"with the checkpoint's used ids: replace_embeddings(model, Compaction.load(checkpoint_dir)) reads its "
            f"pema_compaction.json (add trainable_ids=Compaction.load(checkpoint_dir, 'trainable_ids') where only "
            f"some rows trained)")


def _record_compactions(optimizer, state_dict):
    """Optimizer state-dict post-hook: each saved group records the fingerprints of its compact parameters."""
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        record = {str(i): getattr(p, _COMPACTION) for i, p in enumerate(group["params"]) if hasattr(p, _COMPACTION)}
        if record:
            saved[_RECORD] = record
    return state_dict


_hook = register_optimizer_step_pre_hook(_check_optimizer_step)  # for every optimizer of this process


def check_full_vocabulary_logits(handle, model, args, output) -> None:
    """Forward hook of a model whose logits must have V columns (`frozen`, or the head untouched)."""
    logits = output if torch.is_tensor(output) else getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    num_used, vocab_size = handle.compaction.num_used, handle.compaction.vocab_size
    if not torch.is_tensor(logits) or logits.dim() == 0 or logits.shape[-1] != num_used or num_used == vocab_size:
        return
    if logits is output and num_used == handle.embeddings[0].embedding_dim:
        return  # a bare [.., D] tensor: hidden states as wide as U, not logits
    raise PemaError(
        f"{type(model).__name__} returned logits over {num_used} columns (U) where the full vocabulary has "
        f"{vocab_size}: its forward reads the compacted matrix (now [U, D]) directly instead of calling the "
        f"embedding or head module. Compute the logits with the model's output embedding module, or use "
        f"output='restricted' if U columns are what you want"
    )


class _RefusedWhileCompacted:
    """`model.<name>` while the model is compacted: raises instead of changing the vocabulary or the modules."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise AlreadyCompactedError(
            f"{self.name}() on a compacted model would change the [U, D] compact matrices or the modules that "
            f"restore_embeddings merges the trained rows back from, and lose them. Call restore_embeddings(model) "
            f"first (the trained rows merge into the full matrices), then {self.name}(), then scan and "
            f"replace_embeddings again"
        )


def refuse_vocabulary_changes(handle) -> None:
    """Makes each vocabulary-changing method of the model raise until restore (an instance attribute undo removes)."""
    for name in _VOCABULARY_CHANGES:
        if callable(getattr(handle.model, name, None)):
            handle.patch(handle.model, name, _RefusedWhileCompacted(name))
