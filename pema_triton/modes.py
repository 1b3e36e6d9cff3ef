"""Output modes: what `replace_embeddings(model, used_ids, output=...)` does with the output embedding (LM head).

- "frozen": U rows train, the rest stay frozen in the head; logits [..., V]; `generate()` embeds an unused id it
  emits with its frozen row.
- "restricted": U rows only; logits [..., U]; `config.vocab_size` is U, labels are remapped to compact columns,
  and `generate()` / `save_pretrained()` see V columns and V.
- None (:class:`UntouchedHead`): the head is left alone (untied models only); as "frozen" for `generate()`.

The two that compact the head take `fused_loss=True` (`mode.fused`, :mod:`pema_triton.fused_loss`). Each mode is
one object that knows how it sets up and runs a :class:`~pema_triton.head.CompactLMHead`, what a
converted head must give on the original's logits (the probe), how it patches the model and how that is undone:
nothing outside this module branches on the mode's name.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .errors import PemaError
from .fused_lm_head import adapt_head_readers, refuse_foreign_head_readers
from .fused_loss import FusedLoss
from .guards import check_full_vocabulary_logits
from .id_check import LabelCheck
from .model_patches import (
    embedding_unused_ids,
    full_vocabulary,
    remap_labels,
    set_vocab_size,
    slice_logit_biases,
    vocab_configs,
    wrap_method,
)
from .ops.frozen_head_linear import frozen_head_linear

__all__ = [
    "FROZEN", "FUSED_FROZEN", "FUSED_RESTRICTED", "OUTPUT_MODES", "RESTRICTED", "UNTOUCHED", "OutputMode", "head_mode",
    "output_mode",
]


class OutputMode:
    """The interface of an output mode, with the defaults of a full-vocabulary one. Subclass it for a new mode."""

    name: str | None = None
    compacts_head = True
    fused_loss = False  # the loss computed with the head, without logits (pema_triton.fused_loss)
    logits_over_used_ids = False  # logits [..., U] (column i for used_ids[i]) rather than [..., V]
    head_buffers: tuple[str, ...] = ()  # buffers setup_head adds to a head, removed when it is uncompacted

    # -- the head module -------------------------------------------------------------------------------------
    def out_features(self, vocab_size: int, num_used: int) -> int:
        return vocab_size

    def setup_head(self, head, full_weight: torch.Tensor, full_bias: torch.Tensor | None) -> None:
        """Adds what the mode keeps of the full head [V, D] / [V] to a head being compacted."""

    def teardown_head(self, head) -> None:
        """Removes what `setup_head` added, as the head is uncompacted."""
        for name in self.head_buffers:
            head._buffers.pop(name, None)

    def head_forward(self, head, hidden: torch.Tensor) -> torch.Tensor:
        """[*, D] -> the head's logits."""
        raise NotImplementedError

    def compacted_logits(self, logits: torch.Tensor, used_ids: torch.Tensor) -> torch.Tensor:
        """What the compacted head must give where the original gave `logits` [*, V] (checked after conversion)."""
        return logits

    def same_logits(self, got: torch.Tensor, want: torch.Tensor) -> bool:
        return torch.equal(got, want)

    def load_full(self, head, name: str, full: torch.Tensor) -> None:
        """A full-vocabulary checkpoint tensor `full` for the head's `name` ("weight" or "bias") was loaded."""

    def frozen_rows(self, head) -> torch.Tensor | None:
        """A [V, D] matrix on the head's device holding every frozen row, or None."""
        return None

    def label_check_remap(self, handle, head) -> torch.Tensor | None:
        """The [V] table that names a bad label in an error (:class:`~pema_triton.id_check.LabelCheck`), or None
        where the mode checks no labels."""
        return None

    @property
    def fused(self) -> OutputMode:
        """This mode with `fused_loss=True`: the loss computed with the head, without logits."""
        raise PemaError(f"fused_loss=True needs output='frozen' or 'restricted' (a compacted head), got {self!r}")

    # -- the model -------------------------------------------------------------------------------------------
    def check_tied(self, tied_head_path: str | None) -> None:
        """Raises if this mode cannot keep a head tied to the input embedding (at `tied_head_path`) tied."""

    def patch_model(self, handle) -> None:
        """Changes the model around the head for this mode; registers each change's undo with `handle.on_undo`.

        Full-vocabulary logits may make `generate()` pick an id the data never used: it is embedded with its
        frozen row, as full fine-tuning with the unused rows frozen would.
        """
        wrap_method(handle, "generate", functools.partial(embedding_unused_ids, handle))
        hook = handle.model.register_forward_hook(functools.partial(check_full_vocabulary_logits, handle))
        handle.on_undo(hook.remove)
        if self.compacts_head:
            _refuse_readers_of_the_head_weight(handle)

    def __repr__(self) -> str:
        return repr(self.name) + (" (fused loss)" if self.fused_loss else "")


def _refuse_readers_of_the_head_weight(handle) -> None:
    """Forwards that read `lm_head.weight` as [V, D] (TRL's, Liger's): TRL's adapted, any other refused
    (:mod:`pema_triton.fused_lm_head`)."""
    adapt_head_readers(handle)
    hook = handle.model.register_forward_pre_hook(functools.partial(refuse_foreign_head_readers, handle),
                                                  with_kwargs=True)
    handle.on_undo(hook.remove)


class UntouchedHead(OutputMode):
    """`output=None`: only the input embedding is compacted; the head keeps its full matrix and trains as it did."""

    compacts_head = False

    def check_tied(self, tied_head_path):
        if tied_head_path is not None:
            raise PemaError(
                f"output=None would compact the input embedding but not {tied_head_path!r}, which is tied to it, "
                f"silently untying them; use output='frozen' (same logits) or 'restricted'"
            )


class FrozenHead(OutputMode):
    """Full-vocabulary logits, bit-identical to the original head's; the unused rows stay in a frozen buffer."""

    name = "frozen"
    head_buffers = ("frozen_weight", "frozen_bias")

    def setup_head(self, head, full_weight, full_bias):
        # The whole [V, D] matrix as a buffer: its unused rows are the frozen ones, and its U used rows are
        # overwritten from `weight` at every forward, so the logits come from the very GEMM the original head
        # runs (see ops.frozen_head_linear). Costs U x D more memory than a (V - U)-row buffer; no gradient or
        # optimizer state is ever [V, D].
        head.register_buffer("frozen_weight", full_weight.detach().clone(), persistent=False)
        frozen_bias = full_bias.detach().clone() if full_bias is not None else None
        head.register_buffer("frozen_bias", frozen_bias, persistent=False)

    def head_forward(self, head, hidden):
        return frozen_head_linear(hidden, head.weight, head.bias, head.frozen_weight, head.frozen_bias, head.used_ids)

    def load_full(self, head, name, full):
        with torch.no_grad():
            getattr(head, f"frozen_{name}").copy_(full)

    def frozen_rows(self, head):
        return head.frozen_weight

    @property
    def fused(self):
        return FUSED_FROZEN


class RestrictedHead(OutputMode):
    """Logits over the used ids only ([..., U]): a softmax over the scanned vocabulary."""

    name = "restricted"
    logits_over_used_ids = True

    def out_features(self, vocab_size, num_used):
        return num_used

    def setup_head(self, head, full_weight, full_bias):
        # Labels become columns in the model's pre-hook (model_patches.remap_labels), checked without a host sync.
        LabelCheck.attach(head, True)

    def teardown_head(self, head):
        super().teardown_head(head)
        LabelCheck.detach(head)

    def label_check_remap(self, handle, head):
        return handle.embeddings[0].remap  # the embedding's table: an unused label is named as unused

    def head_forward(self, head, hidden):
        logits = F.linear(hidden, head.weight, head.bias)
        return head.expand_logits(logits) if head.expand_logits_in_forward else logits

    def compacted_logits(self, logits, used_ids):
        return logits.index_select(-1, used_ids.to(logits.device))

    def same_logits(self, got, want):
        # A GEMM over U columns may block differently from the one over V: equal to round-off, not bit for bit.
        return got.shape == want.shape and torch.allclose(got, want, atol=1e-4)

    def patch_model(self, handle):
        """Logit biases sliced to U, `config.vocab_size` U, labels remapped to compact columns, and V columns
        (with `config.vocab_size` V) during `generate()` and `save_pretrained()`."""
        if not handle.heads:
            return  # a model without an output embedding (BertModel): only its input was compacted
        handle.heads[0].label_check.mode = LabelCheck.mode_for(handle.embeddings[0].check_ids)
        _refuse_readers_of_the_head_weight(handle)
        slice_logit_biases(handle)
        configs = vocab_configs(handle)
        set_vocab_size(handle, configs, handle.compaction.num_used)
        hook = handle.model.register_forward_pre_hook(functools.partial(remap_labels, handle), with_kwargs=True)
        handle.on_undo(hook.remove)
        for method in ("generate", "save_pretrained"):
            wrap_method(handle, method, functools.partial(full_vocabulary, handle, configs))

    @property
    def fused(self):
        return FUSED_RESTRICTED


class FusedFrozenHead(FusedLoss, FrozenHead):
    """`frozen` with the fused loss: the head's rows from the compact Parameter (used ids) and the frozen buffer."""

    def loss_head(self, head):
        return head.frozen_weight, head.used_ids


class FusedRestrictedHead(FusedLoss, RestrictedHead):
    """`restricted` with the fused loss: a softmax over the U used rows, every one trainable (no frozen rows)."""

    def loss_head(self, head):
        return None, None


FROZEN, RESTRICTED, UNTOUCHED = FrozenHead(), RestrictedHead(), UntouchedHead()
FUSED_FROZEN, FUSED_RESTRICTED = FusedFrozenHead(), FusedRestrictedHead()
OUTPUT_MODES = {mode.name: mode for mode in (FROZEN, RESTRICTED, UNTOUCHED)}


def output_mode(output: str | None | OutputMode) -> OutputMode:
    """The mode object for `replace_embeddings(output=...)`: "frozen", "restricted" or None (head untouched)."""
    if isinstance(output, OutputMode):
        return output
    if isinstance(output, str) or output is None:
        if output in OUTPUT_MODES:
            return OUTPUT_MODES[output]
    raise PemaError(f"output must be one of {tuple(OUTPUT_MODES)}, got {output!r}")


def head_mode(output: str | OutputMode) -> OutputMode:
    """The mode object for a :class:`~pema_triton.head.CompactLMHead`: "frozen" or "restricted"."""
    modes = tuple(name for name, mode in OUTPUT_MODES.items() if mode.compacts_head)
    mode = OUTPUT_MODES.get(output) if isinstance(output, str) else output
    if not isinstance(mode, OutputMode) or not mode.compacts_head:
        raise PemaError(f"output must be one of {modes} for a compact head, got {output!r}")
    return mode


