"""How an output mode changes the model around its head, each change with its undo on the handle: `generate()` and
`save_pretrained()` run in a context, logit biases sliced to U, `config.vocab_size` set, labels remapped.

Used by :mod:`pema_triton.modes` (and `arguments_by_name` by :mod:`pema_triton.fused_loss`).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack, contextmanager

import torch

from .checkpoint import register_sliced_buffer
from .distributed import warn_on_main_process
from .errors import PemaWarning
from .ops.remap import compact_rows

__all__ = [
    "arguments_by_name", "embed_unused_ids", "embedding_unused_ids", "full_vocabulary", "look_up_frozen_used_ids",
    "remap_labels", "set_vocab_size", "slice_logit_biases", "vocab_configs", "wrap_method",
]

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


def wrap_method(handle, name: str, context) -> None:
    """Makes `model.<name>` run inside `context()`, as an instance attribute that undo removes."""
    if hasattr(handle.model, name):
        handle.patch(handle.model, name, _InContext(getattr(handle.model, name), context))


def _put_buffer(module, name: str, buffer: torch.Tensor) -> None:
    module._buffers[name] = buffer


@contextmanager
def kept_matrices_follow_dtype(handle):
    """Around `model._apply` (`.to(dtype)`, `.half()`, `.float()`): a kept full matrix whose compact rows changed
    dtype is cast with them, where it is kept (its device does not change). A plain model's unused rows round
    through every cast (fp32 -> bf16 -> fp32 loses their low bits); the restored model's must have too, so that
    restore gives what the uncompacted model would hold after the same calls, not rows that skipped a cast."""
    # Read again after: a conversion may put new Parameter objects in (swap_module_params_on_conversion).
    before = [None if compact is None else compact.dtype for _, compact in handle.kept_and_compact()]
    yield
    for (kept, compact), dtype in zip(handle.kept_and_compact(), before):
        if kept is not None and compact is not None and compact.dtype not in (dtype, kept.param.dtype):
            kept.param.data = kept.param.data.to(compact.dtype)


def _unused_rows(handle) -> torch.Tensor:
    """[V, D] holding every unused input row: a tied frozen head's buffer (on the device already), else the kept
    original matrix (on the CPU when offloaded: a few rows a step)."""
    rows = handle.output_mode.frozen_rows(handle.heads[0]) if handle.tied and handle.heads else None
    return handle.kept_input.param.data if rows is None else rows


def embed_unused_ids(handle) -> None:
    """From now until restore, every compacted input embedding embeds an unused id with its frozen row (no
    gradient), in training too: for online trainers, whose completions hold ids nobody scanned."""
    rows = functools.partial(_unused_rows, handle)  # read at each forward: the rows follow .to(), copies, loads
    for embedding in handle.embeddings:
        _set_undoably(handle, embedding, unused_rows=rows, lookup_remap=None)


def look_up_frozen_used_ids(handle) -> None:
    """With `trainable_ids=`: every compacted input embedding (whose rows are the trainable ids) embeds the other
    used ids with their frozen rows, no gradient; ids outside the used set (`handle.lookup`) are refused still."""
    rows = functools.partial(_unused_rows, handle)
    for embedding in handle.embeddings:  # lookup_remap is a buffer: it follows the module's device
        _set_undoably(handle, embedding, unused_rows=rows, lookup_remap=handle.lookup.remap(embedding.remap.device))


def _set_undoably(handle, module, **values) -> None:
    """Sets plain attributes of `module`; undo puts the previous values back."""
    for name, value in values.items():
        handle.on_undo(functools.partial(setattr, module, name, getattr(module, name)))
        setattr(module, name, value)


@contextmanager
def embedding_unused_ids(handle):
    """Every compacted input embedding embeds unused ids with their frozen rows (:func:`_unused_rows`)."""
    rows = _unused_rows(handle)
    with ExitStack() as stack:
        for embedding in handle.embeddings:
            stack.enter_context(embedding.embedding_unused_ids(rows))
        yield


@contextmanager
def full_vocabulary(handle, configs):
    """V-column logits indexed by original ids (unused ids at the lowest logit, never picked) and
    `config.vocab_size = V`, so generate() feeds back original ids and save_pretrained() writes V."""
    with ExitStack() as stack:
        for head in handle.heads:
            stack.enter_context(head.full_vocabulary_logits())
        set_vocab_size(None, configs, handle.compaction.vocab_size)
        try:
            yield
        finally:
            set_vocab_size(None, configs, handle.compaction.num_used)


def vocab_configs(handle) -> list:
    """The model's config (and its text config, for multimodal models) where it states V."""
    config = getattr(handle.model, "config", None)
    configs = [config, getattr(config, "get_text_config", lambda: None)()] if config is not None else []
    vocab_size = handle.compaction.vocab_size
    return list({id(c): c for c in configs if c is not None and getattr(c, "vocab_size", None) == vocab_size}.values())


def set_vocab_size(handle, configs: list, vocab_size: int) -> None:
    """Sets `vocab_size` on every config; with a handle, its undo puts the original V back."""
    for config in configs:
        config.vocab_size = vocab_size
    if handle is not None:
        handle.on_undo(functools.partial(set_vocab_size, None, configs, handle.compaction.vocab_size))


def slice_logit_biases(handle) -> None:
    """Logit biases added after the head (BART's `final_logits_bias` [1, V]) shrink with the logits to [1, U]."""
    vocab_size = handle.compaction.vocab_size
    for module in handle.model.modules():
        for name, buffer in list(module._buffers.items()):
            if name.endswith("logits_bias") and buffer is not None and buffer.shape[-1] == vocab_size:
                module._buffers[name] = buffer.index_select(-1, handle.compaction.used_ids.to(buffer.device))
                handle.on_undo(functools.partial(_put_buffer, module, name, buffer))
                register_sliced_buffer(handle, module, name, buffer)


def remap_labels(handle, model, args, kwargs):
    """Forward pre-hook: labels in original ids (by keyword or by position) become compact columns for the
    [..., U] logits. A training forward without labels gets a warning: a loss computed outside the model (the
    Trainer's label smoothing, a custom loss) must remap its labels too."""
    if "labels" not in kwargs and args:
        args, kwargs = arguments_by_name(model, args, kwargs)
    labels = kwargs.get("labels")
    if labels is None:
        if model.training:
            warn_on_main_process(
                "a training forward of a model compacted with output='restricted' got no labels: its logits are over "
                "the U used ids (column i is used_ids[i]), so a loss computed outside the model (such as the Trainer's "
                "label smoothing) must use handle.labels_to_columns(labels)", PemaWarning, stacklevel=2)
        return args, kwargs
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and kwargs.get(
        "decoder_input_ids"
    ) is None and hasattr(model, "prepare_decoder_input_ids_from_labels"):
        # Decoder inputs come from the labels in *original* ids, before the labels become compact columns.
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    ignore_index = kwargs.get("ignore_index", -100)  # the model's loss takes it, and passes it through
    for name in ("labels", "shift_labels"):  # shift_labels: already shifted, in original ids as labels are
        if kwargs.get(name) is not None:
            kwargs[name] = _checked_columns(handle, kwargs[name], ignore_index)
    return args, kwargs


def _checked_columns(handle, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Original-id labels -> compact columns, without a host sync: a label with no column (unused, or outside
    [0, V)) is counted by the head's label check (an error now on CPU, later on CUDA or when compiled) and ignored
    meanwhile, where the model's cross-entropy would have failed on it."""
    # Buffers are read at each call: `model.to("cuda")` after replace puts new tensors in them.
    head, remap = handle.heads[0], handle.embeddings[0].remap
    ignored = labels == ignore_index
    columns = compact_rows(torch.where(ignored, 0, labels), remap.to(labels.device)).view(labels.shape)
    bad = (columns < 0) & ~ignored
    shown = torch.where(ignored, head.used_ids[0].to(labels.device), labels)  # the error names only the bad
    head.label_check.count(head, shown, bad, remap)
    return torch.where(ignored | bad, ignore_index, columns.to(labels.dtype))


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
