"""`PemaHandle`: what `replace_embeddings` changed in a model, how much it saves, and how to undo it.

The handle owns the state of one compaction: references to the converted modules (not paths, which a wrapper
such as DDP or PEFT renames), the full original matrices kept until restore, and a stack of undo steps that every
change registers as it is made, so a failure part-way and a restore run the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import HEAD_BIAS, HEAD_WEIGHT, INPUT
from .distributed import main_process_logger, refuse_sharded_restore, whole
from .errors import NotCompactedError, PemaError
from .guards import mark_stale, register_managed, release_managed, unmark_stale
from .modes import OutputMode
from .ops.remap import Compaction, labels_to_columns, raise_for_out_of_range
from .wrappers import inner_model

logger = main_process_logger(__name__)

__all__ = ["KeptMatrix", "PemaHandle", "get_handle"]

_HANDLE_ATTR = "_pema_handle"


@dataclass
class KeptMatrix:
    """A full-vocabulary Parameter taken out of the model until restore, and the device it came from."""

    param: nn.Parameter
    device: torch.device

    @classmethod
    def of(cls, param: nn.Parameter) -> KeptMatrix:
        """Takes `param` out of training until restore: an optimizer built before the compaction refuses to step it."""
        mark_stale(param, "it is a full-vocabulary matrix that replace_embeddings took out of the model (it no "
                          "longer trains); build the optimizer after replace_embeddings")
        return cls(param, param.device)

    def follow(self, compact: torch.Tensor | None) -> None:
        """Moves to `compact`'s device and dtype (`model.to(...)` after replace moved only the compact
        Parameters, and the restored model must be what `.to()` would have made it), else back where it was."""
        target = {"device": self.device} if compact is None else {"device": compact.device, "dtype": compact.dtype}
        self.param.data = self.param.data.to(**target)


_MISSING = object()


def _put_back(obj: object, name: str, previous: object) -> None:
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = previous


def _retire(*compact_params: nn.Parameter | None) -> None:
    """The compact Parameters of a restored model no longer train: an optimizer still holding them refuses to step."""
    for param in compact_params:
        mark_stale(param, "it holds the compact rows of a model that restore_embeddings has merged back; build a "
                          "new optimizer (and Trainer) for the restored model, or call replace_embeddings again first")


def get_handle(model: nn.Module) -> PemaHandle | None:
    """The handle of a compacted model (or of the PEFT / sentence-transformers wrapper around it), or None."""
    return getattr(inner_model(model), _HANDLE_ATTR, None)


def trainable_stats(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, AdamW training-state bytes = weight + gradient + 2 moments, in the param dtype)."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() deduplicates tied ones
    return sum(p.numel() for p in params), sum(4 * p.numel() * p.element_size() for p in params)


class PemaHandle:
    """One compacted model: the converted modules, the kept full matrices, sizes before and after, and undo.

    Attributes:
        model: the compacted model. compaction: its used ids and V. output_mode: the head's mode. tied: whether
            the head shares the input embedding's matrix.
        embeddings / heads: the converted modules (every holder of the input matrix / of the head's matrix).
        kept_input, kept_head_weight, kept_head_bias: the full original Parameters (None where not compacted).
        bias_aliases: other (module, attribute) slots sharing the head's bias (BERT's `cls.predictions.bias`).
        params_before / params_after, state_bytes_before / state_bytes_after: trainable parameters and AdamW
            training-state bytes.
    """

    def __init__(self, model: nn.Module, compaction: Compaction, output_mode: OutputMode, tied: bool):
        self.model, self.compaction, self.output_mode, self.tied = model, compaction, output_mode, tied
        # The used ids the embeddings look up; the compaction (the compact rows) is a subset where only some train.
        self.lookup: Compaction = compaction
        self.embeddings: list[nn.Embedding] = []
        self.heads: list[nn.Linear] = []
        self._converted: list[tuple[nn.Module, type]] = []  # (module, its class before), in conversion order
        self.kept_input: KeptMatrix | None = None
        self.kept_head_weight: KeptMatrix | None = None
        self.kept_head_bias: KeptMatrix | None = None
        self.bias_aliases: list[tuple[nn.Module, str]] = []
        self.params_before = self.params_after = self.state_bytes_before = self.state_bytes_after = 0
        self._undo_steps: list[Callable[[], None]] = []
        self._full_cache: tuple[dict | None, dict] = (None, {})  # (the state dict being filled, its tensors)

    def __getstate__(self) -> dict:
        # A copy (EMA, pickling) leaves out the tensors of the last state dict filled: not part of the compaction.
        return {**self.__dict__, "_full_cache": (None, {})}

    def __setstate__(self, state: dict) -> None:
        # A deep copy (or unpickling) of a compacted model: its copied modules are the ones that may run now.
        self.__dict__.update(state)
        for module in self.embeddings + self.heads:
            register_managed(module)

    @property
    def vocab_size(self) -> int:
        return self.compaction.vocab_size

    @property
    def num_used(self) -> int:
        return self.lookup.num_used

    @property
    def used_ids(self) -> torch.Tensor:
        """[U] int64 sorted used ids (on the CPU): the ids the model embeds."""
        return self.lookup.used_ids

    def save_compaction(self, directory) -> None:
        """Writes `pema_compaction.json`: the used ids and, where only some rows train, the trainable ids."""
        self.lookup.save(directory, trainable=self.compaction)

    @property
    def trainable_ids(self) -> torch.Tensor:
        """[T] int64 sorted ids whose rows train (on the CPU): the compact matrices' rows. The used ids, unless
        `replace_embeddings(trainable_ids=)` named a subset."""
        return self.compaction.used_ids

    @property
    def output(self) -> str | None:
        """The `output=` this model was compacted with."""
        return self.output_mode.name

    # -- recording changes -----------------------------------------------------------------------------------
    def converted(self, module: nn.Module, original_class: type) -> None:
        """Records a module converted in place (an embedding or a head), so undo can put its class back."""
        self._converted.append((module, original_class))
        register_managed(module)
        (self.heads if isinstance(module, nn.Linear) else self.embeddings).append(module)

    def original_class(self, module: nn.Module) -> type:
        """The class a converted module had before."""
        return next(cls for converted, cls in self._converted if converted is module)

    def on_undo(self, step: Callable[[], None]) -> None:
        """Registers how to revert a change just made; steps run in reverse order on restore or failure."""
        self._undo_steps.append(step)

    def patch(self, obj: object, name: str, value: object) -> None:
        """Sets `obj.<name>` as an instance attribute (a wrapped method, say); undo puts back what was there."""
        previous = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = value
        self.on_undo(functools.partial(_put_back, obj, name, previous))

    def kept(self, slot: str) -> KeptMatrix:
        """The kept full matrix for a checkpoint slot ("input", "head_weight" or "head_bias")."""
        return {INPUT: self.kept_input, HEAD_WEIGHT: self.kept_head_weight, HEAD_BIAS: self.kept_head_bias}[slot]

    def offload(self, device: torch.device | None) -> None:
        """Moves the kept full matrices to `device` until restore (None: they stay where they are)."""
        for kept in (self.kept_input, self.kept_head_weight, self.kept_head_bias):
            if kept is not None and device is not None and not kept.param.is_meta:
                kept.param.data = kept.param.data.to(device)

    def train_compact_rows(self, where_the_original_trained: bool = False) -> int:
        """Makes the frozen compact Parameters trainable (under PEFT, which froze them with every base weight); with
        `where_the_original_trained`, only those whose full original trained at replace time (PEFT froze them
        after). Returns how many it made trainable."""
        made_trainable = []
        for kept, param in self.kept_and_compact():
            if param is None or param.requires_grad:
                continue  # no such Parameter, or trainable already (a tied head's weight is the embedding's)
            if where_the_original_trained and (kept is None or not kept.param.requires_grad):
                continue
            param.requires_grad_(True)
            made_trainable.append(param)
        return len(made_trainable)

    def finish(self, stats_before: tuple[int, int]) -> None:
        """After a successful compaction: sizes measured, the handle on the model."""
        self.params_before, self.state_bytes_before = stats_before
        self.params_after, self.state_bytes_after = trainable_stats(self.model)
        setattr(self.model, _HANDLE_ATTR, self)
        logger.info("compacted %s: %r", type(self.model).__name__, self)

    # -- ids and columns -------------------------------------------------------------------------------------------
    def labels_to_columns(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Original-id labels -> the compact columns of `restricted` logits (for a loss computed outside the model)."""
        return labels_to_columns(labels, self.embeddings[0].remap.to(labels.device), ignore_index)

    def check_ids(self) -> None:
        """Raises `UnusedIdError` / `IdOutOfRangeError` if any forward since the last check looked up an id the
        compacted embeddings hold no row for. Blocks until the GPU has caught up: call it where training syncs
        anyway (`PemaCallback` does at each log, save and the end of training). See :mod:`pema_triton.id_check`."""
        for embedding in self.embeddings:
            embedding.check_bad_ids()
        for head in self.heads:  # labels a restricted head or a fused loss had no column for
            if "label_check" in head.__dict__:
                head.label_check.check(head, head.output_mode.label_check_remap(self, head))

    def columns_to_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Compact columns of `restricted` logits (e.g. their argmax) -> original token ids.

        Raises:
            IdOutOfRangeError: a column outside [0, U) (a negative one would index from the end).
        """
        raise_for_out_of_range(columns, self.compaction.num_used, what="columns",
                               hint="a column indexes the U used ids (used_ids[column])")
        return self.compaction.used_ids.to(columns.device)[columns]

    # -- checkpoints -----------------------------------------------------------------------------------------
    def full_tensor(self, slot: str, state_dict: dict) -> torch.Tensor:
        """The full-vocabulary tensor of `slot` with the trained rows merged into the kept original, in the trained
        Parameter's dtype, for the state dict `state_dict` being filled.

        Built afresh for each state dict and once within it, so tied names share one tensor as they did. Not
        cached across state dicts by version counter: fused AdamW (`torch._fused_adamw_`, the Trainer's default
        optimizer) updates the compact rows without bumping it, and every checkpoint after the first held the
        rows of the first.
        """
        owner, built = self._full_cache
        if owner is not state_dict:
            built = {}
            self._full_cache = (state_dict, built)  # held until the next state dict, or restore
        if slot not in built:
            kept, trained = self.kept(slot), self._trained(slot).detach()
            # In the dtype the model has now (`model.to(torch.bfloat16)` after replace converts only the compact
            # Parameters), so a checkpoint holds what the uncompacted model would save; on the kept matrix's device.
            full = kept.param.detach().to(trained.dtype, copy=True)
            rows = self.compaction.used_ids.to(full.device)  # the trained rows (with trainable_ids, not all used)
            full.index_copy_(0, rows, whole(trained).to(full))  # FSDP2: all-gathered
            built[slot] = full
        return built[slot]

    def forget_full_tensors(self) -> None:
        """Drops the full tensors of the last state dict (a new state_dict() call starts: it builds its own)."""
        self._full_cache = (None, {})

    def _trained(self, slot: str) -> nn.Parameter:
        if slot == INPUT:
            return self.embeddings[0].weight
        return self.heads[0].weight if slot == HEAD_WEIGHT else self.heads[0].bias

    # -- undo ------------------------------------------------------------------------------------------------
    def restore(self) -> nn.Module:
        """Merges the trained rows back into the full matrices and puts the original modules back.

        Unused rows come back bit-identical to before `replace_embeddings` (or to the last full checkpoint loaded
        while compacted); ties, `config.vocab_size` and `generate` are as they were.

        Raises:
            NotCompactedError: this handle was restored already.
            ShardedModelError: FSDP shards the compact rows (save the full state dict instead).
        """
        if get_handle(self.model) is not self:
            raise NotCompactedError(f"{type(self.model).__name__} is not compacted by this handle: nothing to restore")
        refuse_sharded_restore(self)
        self._refuse_meta_rows()
        self.undo(merge=True)
        delattr(self.model, _HANDLE_ATTR)
        return self.model

    def _refuse_meta_rows(self) -> None:
        """Before any undo step: compact rows on the meta device (`model.to("meta")`) hold no values to merge, and
        a restore stopped part-way would leave the model neither compacted nor whole."""
        # A model planned on the meta device (its full matrices too) has nothing to lose: it restores.
        if any(p is not None and p.is_meta and kept is not None and not kept.param.is_meta
               for kept, p in self.kept_and_compact()):
            raise PemaError(f"{type(self.model).__name__}'s compact rows are on the meta device: their trained values "
                            f"are gone, so there is nothing to merge back; the model stays compacted. Move a copy "
                            f"with real weights (or the model before .to('meta')) and restore that")

    def kept_and_compact(self) -> list[tuple[KeptMatrix | None, nn.Parameter | None]]:
        """(kept full matrix, compact Parameter) of the input embedding, the head's weight and its bias; either side
        None where there is none (a tied head's weight is the embedding's: its kept side is None)."""
        head = self.heads[0] if self.heads else None
        return [(self.kept_input, self.embeddings[0].weight if self.embeddings else None),
                (self.kept_head_weight, getattr(head, "weight", None)),
                (self.kept_head_bias, getattr(head, "bias", None))]

    def undo(self, merge: bool) -> None:
        """Reverts every recorded change, newest first; with `merge`, the trained rows land in the full matrices."""
        while self._undo_steps:
            self._undo_steps.pop()()
        for kept in (self.kept_input, self.kept_head_weight, self.kept_head_bias):
            unmark_stale(kept.param if kept is not None else None)
        for kept, compact in self.kept_and_compact():
            if kept is not None:
                kept.follow(compact)
        self._uncompact_heads(merge)
        self._uncompact_embeddings(merge)
        self._full_cache = (None, {})

    def _uncompact_heads(self, merge: bool) -> None:
        if not self.heads:
            return
        kept_weight = self.kept_input if self.tied else self.kept_head_weight
        if merge:
            bias = self.kept_head_bias.param.data if self.kept_head_bias is not None else None
            self.heads[0].merge_into(kept_weight.param.data, bias)
        full_bias = self.kept_head_bias.param if self.kept_head_bias is not None else None
        _retire(self.heads[0].weight, self.heads[0].bias)
        for module in self.heads:
            release_managed(module)
            module.uncompact_(kept_weight.param, full_bias, self.original_class(module))
        for module, name in self.bias_aliases:
            module._parameters[name] = full_bias
        self.heads.clear()

    def _uncompact_embeddings(self, merge: bool) -> None:
        if not self.embeddings:
            return
        if merge:
            self.embeddings[0].merge_into(self.kept_input.param.data)
        _retire(self.embeddings[0].weight)
        for module in self.embeddings:
            release_managed(module)
            module.uncompact_(self.kept_input.param, self.original_class(module))
        self.embeddings.clear()

    # -- reporting -------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, object]:
        """V, U, T (trainable ids), trainable parameters and AdamW training-state bytes before and after."""
        return {"vocab_size": self.vocab_size, "num_used": self.num_used, "num_trainable": self.compaction.num_used,
                "output": self.output, "tied": self.tied, "trainable_params_before": self.params_before,
                "trainable_params_after": self.params_after, "training_state_bytes_before": self.state_bytes_before,
                "training_state_bytes_after": self.state_bytes_after}

    def __repr__(self) -> str:
        change = self.state_bytes_after / max(1, self.state_bytes_before) - 1  # > 0 under PEFT: LoRA-only before
        trainable = "" if self.lookup is self.compaction else f", {self.compaction.num_used:,} of them trainable"
        return (
            f"PemaHandle(V={self.vocab_size:,}, U={self.num_used:,} ({self.num_used / self.vocab_size:.1%})"
            f"{trainable}, output={self.output!r}, tied={self.tied}, trainable params {self.params_before:,} -> "
            f"{self.params_after:,}, AdamW training state {self.state_bytes_before / 2**20:,.1f} MiB -> "
            f"{self.state_bytes_after / 2**20:,.1f} MiB ({change:+.1%}))"
        )
