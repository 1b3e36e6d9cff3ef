"""Checkpoints of a compacted model: full-vocabulary tensors in and out of `state_dict` / `load_state_dict`.

While compacted, `state_dict()` (and so `save_pretrained` and the Trainer's checkpoints) writes each compacted
matrix as the full [V, ...] tensor under its original name, the trained rows merged into the kept original, so
plain transformers loads it. `load_state_dict` takes such a checkpoint: its unused rows replace the kept ones
(what restore puts back) and its used rows load into the compact Parameters. A checkpoint of another vocabulary
size is refused before anything loads.
"""

from __future__ import annotations

import copy
import functools

import torch

from .distributed import placed_like
from .errors import PemaError, VocabularySizeError

__all__ = ["FullVocabularyCheckpoint", "register_sliced_buffer"]

# Which kept matrix a state-dict entry stands for: the input embedding (also a tied head's weight), or an untied
# head's weight or bias.
INPUT, HEAD_WEIGHT, HEAD_BIAS = "input", "head_weight", "head_bias"


def _deepcopy_with_model(obj, memo):
    """Hook objects bound to a handle are copied only as part of copying the whole model (which is in `memo`
    first): a copy of one module (PEFT's modules_to_save) shares them, rather than dragging a copy of the model."""
    if id(obj.handle.model) not in memo:
        return obj
    duplicate = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = duplicate
    duplicate.__dict__.update(copy.deepcopy(obj.__dict__, memo))
    return duplicate


class FullVocabularyCheckpoint:
    """The state-dict hooks of one compacted model (see the module docstring). :meth:`register` installs them
    and hands their removal to the handle's undo."""

    def __init__(self, handle):
        self.handle = handle

    __deepcopy__ = _deepcopy_with_model

    def register(self) -> None:
        handle = self.handle
        hooks = [handle.model.register_load_state_dict_pre_hook(self._check_every_shape),
                 # Each state_dict() call of the model builds its full tensors afresh: a `destination` dict reused
                 # across calls used to get the first call's rows back (a checkpoint of stale weights).
                 handle.model.register_state_dict_pre_hook(functools.partial(_forget_full_tensors, handle))]
        for module in handle.embeddings + handle.heads:
            slots = self._slots(module)
            hooks.append(module.register_state_dict_post_hook(functools.partial(self._save, slots=slots)))
            hooks.append(module.register_load_state_dict_pre_hook(functools.partial(self._load, slots=slots)))
        for module, name in handle.bias_aliases:
            slots = [(name, HEAD_BIAS)]
            hooks.append(module.register_state_dict_post_hook(functools.partial(self._save, slots=slots)))
            hooks.append(module.register_load_state_dict_pre_hook(functools.partial(self._load, slots=slots)))
        for hook in hooks:
            handle.on_undo(hook.remove)
        if hasattr(handle.model, "save_pretrained"):
            save = _SavesCompaction(handle.model.save_pretrained, handle)
            handle.patch(handle.model, "save_pretrained", save)

    def _slots(self, module) -> list[tuple[str, str]]:
        """(attribute, kept matrix) pairs of a compacted module."""
        if module in self.handle.embeddings:
            return [("weight", INPUT)]
        slots = [("weight", INPUT if self.handle.tied else HEAD_WEIGHT)]
        return slots + ([("bias", HEAD_BIAS)] if module.bias is not None else [])

    def _save(self, module, state_dict, prefix, local_metadata, slots):
        for name, slot in slots:
            if prefix + name in state_dict:
                state_dict[prefix + name] = self.handle.full_tensor(slot, state_dict)

    def _check_every_shape(self, root, state_dict, prefix, local_metadata, *args):
        # Runs on the root before any submodule loads: a wrong head must not leave the input matrix overwritten.
        if local_metadata.get("assign_to_params_buffers", False):
            raise PemaError(
                "load_state_dict(assign=True) would replace the compact Parameters with checkpoint tensors, untying a "
                "tied matrix and detaching them from the optimizer; load without assign=True (values are copied in)"
            )
        paths = {id(m): path for path, m in root.named_modules(remove_duplicate=False)}
        targets = [(m, self._slots(m)) for m in self.handle.embeddings + self.handle.heads]
        targets += [(m, [(name, HEAD_BIAS)]) for m, name in self.handle.bias_aliases]
        for module, slots in targets:
            if id(module) not in paths:
                continue
            path = paths[id(module)]
            for name, slot in slots:
                key = prefix + (f"{path}." if path else "") + name
                if key in state_dict:
                    self._kept_for(key, state_dict[key], slot)

    def _load(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors, slots):
        for name, slot in slots:
            key = prefix + name
            if key not in state_dict:
                continue
            full = state_dict[key]
            kept = self._kept_for(key, full, slot)
            with torch.no_grad():
                kept.param.copy_(full)  # the checkpoint's unused rows become the ones restore puts back
            if module in self.handle.heads:
                module.output_mode.load_full(module, name, full)
            used = self.handle.compaction.used_ids
            # What the compact Parameter loads (for FSDP2's DTensor, this rank's shard of it).
            state_dict[key] = placed_like(full.index_select(0, used.to(full.device)), getattr(module, name))

    def _kept_for(self, key, full, slot):
        kept = self.handle.kept(slot)
        if full.shape != kept.param.shape:
            raise VocabularySizeError(
                f"checkpoint tensor {key!r} has shape {tuple(full.shape)}, but this model was compacted from "
                f"{tuple(kept.param.shape)} (V={self.handle.compaction.vocab_size:,}); it belongs to another vocabulary"
            )
        return kept


class _SavesCompaction:
    """`save_pretrained` that also writes the compaction (`pema_compaction.json`) beside the weights, so a Trainer
    checkpoint records which rows its optimizer state belongs to and can be resumed under the same used ids."""

    def __init__(self, save_pretrained, handle):
        self.save_pretrained, self.handle = save_pretrained, handle
        functools.update_wrapper(self, save_pretrained)

    def __call__(self, save_directory, *args, **kwargs):
        result = self.save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.handle.save_compaction(save_directory)
        return result


def _forget_full_tensors(handle, module, prefix, keep_vars) -> None:
    handle.forget_full_tensors()


def register_sliced_buffer(handle, module, name: str, original: torch.Tensor) -> None:
    """State-dict hooks for a buffer sliced to the used columns while compacted ([..., V] -> [..., U], e.g. BART's
    `final_logits_bias`): saved as `original` [..., V]; a loaded [..., V] tensor updates `original` and loads sliced.
    """
    sliced = _SlicedBuffer(handle, name, original)
    # partials, not bound methods: torch marks state-dict hooks with an attribute, which a method cannot take.
    handle.on_undo(module.register_state_dict_post_hook(functools.partial(_SlicedBuffer.save, sliced)).remove)
    handle.on_undo(module.register_load_state_dict_pre_hook(functools.partial(_SlicedBuffer.load, sliced)).remove)


class _SlicedBuffer:
    def __init__(self, handle, name: str, original: torch.Tensor):
        self.handle, self.name, self.original = handle, name, original

    __deepcopy__ = _deepcopy_with_model

    def save(self, module, state_dict, prefix, local_metadata):
        if prefix + self.name in state_dict:
            state_dict[prefix + self.name] = self.original

    def load(self, module, state_dict, prefix, *args):
        key = prefix + self.name
        if key in state_dict:
            with torch.no_grad():
                self.original.copy_(state_dict[key])
            used = self.handle.compaction.used_ids
            state_dict[key] = self.original.index_select(-1, used.to(self.original.device))
