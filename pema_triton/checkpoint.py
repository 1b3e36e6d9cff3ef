"""Checkpoints of a compacted model: full-vocabulary tensors in and out of `state_dict` / `load_state_dict`.

While compacted, `state_dict()` (and so `save_pretrained` and the Trainer's checkpoints) writes each compacted
matrix as the full [V, ...] tensor under its original name, the trained rows merged into the kept original, so
plain transformers loads it. `load_state_dict` takes such a checkpoint: its unused rows replace the kept ones
(what restore puts back) and its used rows load into the compact Parameters. A checkpoint of another vocabulary
size is refused before anything loads.
"""

from __future__ import annotations

import functools

import torch

from .errors import VocabularySizeError

__all__ = ["FullVocabularyCheckpoint", "register_sliced_buffer"]

# Which kept matrix a state-dict entry stands for: the input embedding (also a tied head's weight), or an untied
# head's weight or bias.
INPUT, HEAD_WEIGHT, HEAD_BIAS = "input", "head_weight", "head_bias"


class FullVocabularyCheckpoint:
    """The state-dict hooks of one compacted model (see the module docstring). :meth:`register` installs them
    and hands their removal to the handle's undo."""

    def __init__(self, handle):
        self.handle = handle

    def register(self) -> None:
        handle = self.handle
        hooks = [handle.model.register_load_state_dict_pre_hook(self._check_every_shape)]
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

    def _slots(self, module) -> list[tuple[str, str]]:
        """(attribute, kept matrix) pairs of a compacted module."""
        if module in self.handle.embeddings:
            return [("weight", INPUT)]
        slots = [("weight", INPUT if self.handle.tied else HEAD_WEIGHT)]
        return slots + ([("bias", HEAD_BIAS)] if module.bias is not None else [])

    def _save(self, module, state_dict, prefix, local_metadata, slots):
        for name, slot in slots:
            if prefix + name in state_dict:
                state_dict[prefix + name] = self.handle.full_tensor(slot)

    def _check_every_shape(self, root, state_dict, prefix, *args):
        # Runs on the root before any submodule loads: a wrong head must not leave the input matrix overwritten.
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
            state_dict[key] = full.index_select(0, used.to(full.device))  # what the compact Parameter loads

    def _kept_for(self, key, full, slot):
        kept = self.handle.kept(slot)
        if full.shape != kept.param.shape:
            raise VocabularySizeError(
                f"checkpoint tensor {key!r} has shape {tuple(full.shape)}, but this model was compacted from "
                f"{tuple(kept.param.shape)} (V={self.handle.compaction.vocab_size:,}); it belongs to another vocabulary"
            )
        return kept


def register_sliced_buffer(handle, module, name: str, original: torch.Tensor) -> None:
    """State-dict hooks for a buffer sliced to the used columns while compacted ([..., V] -> [..., U], e.g. BART's
    `final_logits_bias`): saved as `original` [..., V]; a loaded [..., V] tensor updates `original` and loads sliced.
    """

    def save(module, state_dict, prefix, local_metadata):
        if prefix + name in state_dict:
            state_dict[prefix + name] = original

    def load(module, state_dict, prefix, *args):
        if prefix + name in state_dict:
            with torch.no_grad():
                original.copy_(state_dict[prefix + name])
            used = handle.compaction.used_ids
            state_dict[prefix + name] = original.index_select(-1, used.to(original.device))

    handle.on_undo(module.register_state_dict_post_hook(save).remove)
    handle.on_undo(module.register_load_state_dict_pre_hook(load).remove)
