"""Output modes: what `replace_embeddings(model, used_ids, output=...)` does with the output embedding (LM head).

- "frozen": U rows train, the rest stay frozen in the head; logits [..., V]; `generate()` embeds an unused id it
  emits with its frozen row.
- "restricted": U rows only; logits [..., U]; `config.vocab_size` is U, labels are remapped to compact columns,
  and `generate()` / `save_pretrained()` see V columns and V.
- None: the head is left alone (untied models only); as "frozen" for `generate()`.

Each mode is one object that knows how it sets up and runs a :class:`~pema_triton.head.CompactLMHead`, what a
converted head must give on the original's logits (the probe), how it patches the model and how that is undone:
nothing outside this module branches on the mode's name.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

from .checkpoint import register_sliced_buffer
from .errors import PemaError, PemaWarning
from .guards import check_full_vocabulary_logits
from .head_ops import frozen_head_linear
from .remap import labels_to_columns

__all__ = ["FROZEN", "INPUT_ONLY", "OUTPUT_MODES", "RESTRICTED", "OutputMode", "head_mode", "output_mode"]


class OutputMode:
    """The interface of an output mode, with the defaults of a full-vocabulary one. Subclass it for a new mode."""

    name: str | None = None
    compacts_head = True
    fused_loss = False  # the loss computed with the head, without logits (pema_triton.fused)
    logits_over_used_ids = False  # logits [..., U] (column i for used_ids[i]) rather than [..., V]
    head_buffers: tuple[str, ...] = ()  # buffers setup_head adds to a head, removed when it is uncompacted

    # -- the head module -------------------------------------------------------------------------------------
    def out_features(self, vocab_size: int, num_used: int) -> int:
        return vocab_size

    def setup_head(self, head, full_weight: torch.Tensor, full_bias: torch.Tensor | None) -> None:
        """Adds what the mode keeps of the full head [V, D] / [V] to a head being compacted."""

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

    # -- the model -------------------------------------------------------------------------------------------
    def check_tied(self, tied_head_path: str | None) -> None:
        """Raises if this mode cannot keep a head tied to the input embedding (at `tied_head_path`) tied."""

    def patch_model(self, handle) -> None:
        """Changes the model around the head for this mode; registers each change's undo with `handle.on_undo`.

        Full-vocabulary logits may make `generate()` pick an id the data never used: it is embedded with its
        frozen row, as full fine-tuning with the unused rows frozen would.
        """
        _wrap_method(handle, "generate", functools.partial(_embedding_unused_ids, handle))
        hook = handle.model.register_forward_hook(functools.partial(check_full_vocabulary_logits, handle))
        handle.on_undo(hook.remove)

    def __repr__(self) -> str:
        return repr(self.name) + (" (fused loss)" if self.fused_loss else "")


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


class RestrictedHead(OutputMode):
    """Logits over the used ids only ([..., U]): a softmax over the scanned vocabulary."""

    name = "restricted"
    logits_over_used_ids = True

    def out_features(self, vocab_size, num_used):
        return num_used

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
        _slice_logit_biases(handle)
        configs = _vocab_configs(handle)
        _set_vocab_size(handle, configs, handle.compaction.num_used)
        hook = handle.model.register_forward_pre_hook(functools.partial(_remap_labels, handle), with_kwargs=True)
        handle.on_undo(hook.remove)
        for method in ("generate", "save_pretrained"):
            _wrap_method(handle, method, functools.partial(_full_vocabulary, handle, configs))


FROZEN, RESTRICTED, INPUT_ONLY = FrozenHead(), RestrictedHead(), UntouchedHead()
OUTPUT_MODES = {mode.name: mode for mode in (FROZEN, RESTRICTED, INPUT_ONLY)}


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


# -- model patches -------------------------------------------------------------------------------------------
# Every patch and undo step is a bound method or a functools.partial of a module-level function, never a closure:
# `copy.deepcopy(model)` (EMA copies, AveragedModel) then rebinds each to the copy, and pickling works.


class _InContext:
    """`model.<method>` run inside `context()`: an instance attribute of the model while it is compacted."""

    def __init__(self, method, context):
        self.method, self.context = method, context
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        with self.context():
            return self.method(*args, **kwargs)

    def __reduce__(self):
        # Not the attributes update_wrapper copied (`__annotations__` holds ForwardRefs that cannot be pickled).
        return _InContext, (self.method, self.context)


def _wrap_method(handle, name: str, context) -> None:
    """Makes `model.<name>` run inside `context()`, as an instance attribute that undo removes."""
    if hasattr(handle.model, name):
        handle.patch(handle.model, name, _InContext(getattr(handle.model, name), context))


def _put_buffer(module, name: str, buffer: torch.Tensor) -> None:
    module._buffers[name] = buffer


@contextmanager
def _embedding_unused_ids(handle):
    """Every compacted input embedding embeds unused ids with their frozen rows: a tied frozen head holds all of
    them on the device already; otherwise they come from the kept original matrix (on the CPU when offloaded: a
    few rows a step)."""
    rows = handle.output_mode.frozen_rows(handle.heads[0]) if handle.tied and handle.heads else None
    rows = handle.kept_input.param.data if rows is None else rows
    with ExitStack() as stack:
        for embedding in handle.embeddings:
            stack.enter_context(embedding.embedding_unused_ids(rows))
        yield


@contextmanager
def _full_vocabulary(handle, configs):
    """V-column logits indexed by original ids (unused ids at the lowest logit, never picked) and
    `config.vocab_size = V`, so generate() feeds back original ids and save_pretrained() writes V."""
    with ExitStack() as stack:
        for head in handle.heads:
            stack.enter_context(head.full_vocabulary_logits())
        _set_vocab_size(None, configs, handle.compaction.vocab_size)
        try:
            yield
        finally:
            _set_vocab_size(None, configs, handle.compaction.num_used)


def _vocab_configs(handle) -> list:
    """The model's config (and its text config, for multimodal models) where it states V."""
    config = getattr(handle.model, "config", None)
    configs = [config, getattr(config, "get_text_config", lambda: None)()] if config is not None else []
    vocab_size = handle.compaction.vocab_size
    return list({id(c): c for c in configs if c is not None and getattr(c, "vocab_size", None) == vocab_size}.values())


def _set_vocab_size(handle, configs: list, vocab_size: int) -> None:
    """Sets `vocab_size` on every config; with a handle, its undo puts the original V back."""
    for config in configs:
        config.vocab_size = vocab_size
    if handle is not None:
        handle.on_undo(functools.partial(_set_vocab_size, None, configs, handle.compaction.vocab_size))


def _slice_logit_biases(handle) -> None:
    """Logit biases added after the head (BART's `final_logits_bias` [1, V]) shrink with the logits to [1, U]."""
    vocab_size = handle.compaction.vocab_size
    for module in handle.model.modules():
        for name, buffer in list(module._buffers.items()):
            if name.endswith("logits_bias") and buffer is not None and buffer.shape[-1] == vocab_size:
                module._buffers[name] = buffer.index_select(-1, handle.compaction.used_ids.to(buffer.device))
                handle.on_undo(functools.partial(_put_buffer, module, name, buffer))
                register_sliced_buffer(handle, module, name, buffer)


def _remap_labels(handle, model, args, kwargs):
    """Forward pre-hook: labels in original ids (by keyword or by position) become compact columns for the
    [..., U] logits. A training forward without labels gets a warning: a loss computed outside the model (the
    Trainer's label smoothing, a custom loss) must remap its labels too."""
    if "labels" not in kwargs and args:
        args, kwargs = arguments_by_name(model, args, kwargs)
    labels = kwargs.get("labels")
    if labels is None:
        if model.training:
            warnings.warn(
                "a training forward of a model compacted with output='restricted' got no labels: its logits are over "
                "the U used ids (column i is used_ids[i]), so a loss computed outside the model (such as the Trainer's "
                "label smoothing) must use handle.labels_to_columns(labels)", PemaWarning, stacklevel=2)
        return args, kwargs
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and kwargs.get(
        "decoder_input_ids"
    ) is None and hasattr(model, "prepare_decoder_input_ids_from_labels"):
        # Decoder inputs come from the labels in *original* ids, before the labels become compact columns.
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    # The table is read at each call: `model.to("cuda")` after replace puts a new tensor in the buffer.
    remap = handle.embeddings[0].remap
    kwargs["labels"] = labels_to_columns(labels, remap.to(labels.device))
    return args, kwargs


def arguments_by_name(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Positional arguments of `model.forward` passed by keyword instead, so `labels` is found wherever it is."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs  # the forward raises its own error
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            return args, kwargs  # no names to give
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return (), named
