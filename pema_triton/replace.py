"""`replace_embeddings` / `restore_embeddings`: compact a model's input and output embeddings in place.

Works at the level of Parameters, because that is where models share: T5 and BART hold one embedding matrix in
three `nn.Embedding` modules (shared, encoder, decoder), tied LM heads hold it in an `nn.Linear`, BERT-style heads
share their decoder bias with a second attribute. Every module holding the matrix is converted in place
(:meth:`CompactEmbedding.convert_`), all of them to one compact Parameter, so what was tied stays tied, and
module identity, hooks and embedding-subclass behaviour (Gemma's and BART's `embed_scale`) are kept.

While compacted:
- the original full Parameters are kept (moved to `offload`, CPU by default) and untouched, so restoring
  returns every unused row bit for bit;
- `state_dict()` / `save_pretrained` write full-vocabulary tensors under the original names, and
  `load_state_dict` takes full-vocabulary checkpoints (their unused rows replace the kept ones);
- in `restricted` mode `config.vocab_size` is U, labels passed as `labels=` are remapped to compact columns,
  and `generate()` sees V-column logits (unused ids at the lowest value), so it emits original ids.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_used_ids, raise_for_bad_ids
from .errors import (
    AlreadyCompactedError,
    NotCompactedError,
    PemaError,
    PemaWarning,
    UnsupportedModuleError,
    VocabularySizeError,
)
from .modules import CompactEmbedding, CompactLMHead

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_MODES", "PemaHandle", "replace_embeddings", "restore_embeddings", "get_handle"]

OUTPUT_MODES = ("frozen", "restricted", False)
_HANDLE_ATTR = "_pema_handle"
# Ids probed after conversion: each converted module must give what the original gave on them.
_PROBE_IDS = 8


@dataclass
class _Held:
    """A full matrix taken out of the model: the Parameter itself and the device it came from."""

    param: nn.Parameter
    device: torch.device


@dataclass
class PemaHandle:
    """What `replace_embeddings` changed, how much it saves, and how to undo it (:meth:`restore`)."""

    model: nn.Module
    output: str | bool
    vocab_size: int
    used_ids: torch.Tensor
    tied: bool
    embeddings: list[tuple[str, type]] = field(default_factory=list)  # converted modules: (path, original class)
    heads: list[tuple[str, type]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    state_bytes_before: int = 0
    state_bytes_after: int = 0
    _input: _Held | None = None
    _head_weight: _Held | None = None
    _head_bias: _Held | None = None
    _bias_aliases: list[tuple[nn.Module, str]] = field(default_factory=list)
    _logit_buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    _vocab_configs: list[object] = field(default_factory=list)
    _hooks: list = field(default_factory=list)
    _full_cache: dict = field(default_factory=dict)

    @property
    def num_used(self) -> int:
        return self.used_ids.numel()

    def restore(self) -> nn.Module:
        """Same as :func:`restore_embeddings` on this handle's model."""
        return restore_embeddings(self.model)

    def summary(self) -> dict[str, object]:
        """V, U, trainable parameters and AdamW training-state bytes before and after compaction."""
        return {
            "vocab_size": self.vocab_size,
            "num_used": self.num_used,
            "output": self.output,
            "tied": self.tied,
            "trainable_params_before": self.params_before,
            "trainable_params_after": self.params_after,
            "training_state_bytes_before": self.state_bytes_before,
            "training_state_bytes_after": self.state_bytes_after,
        }

    def __repr__(self) -> str:
        saved = 1 - self.state_bytes_after / max(1, self.state_bytes_before)
        return (
            f"PemaHandle(V={self.vocab_size:,}, U={self.num_used:,} ({self.num_used / self.vocab_size:.1%}), "
            f"output={self.output!r}, tied={self.tied}, trainable params {self.params_before:,} -> "
            f"{self.params_after:,}, AdamW training state {self.state_bytes_before / 2**20:,.1f} MiB -> "
            f"{self.state_bytes_after / 2**20:,.1f} MiB (-{saved:.1%}))"
        )

    # -- full-vocabulary views for checkpoints -------------------------------------------------------------
    def _full(self, which: str) -> torch.Tensor:
        """Full-vocabulary tensor of `which` ("input", "head_weight", "head_bias") with the trained rows merged.

        One tensor object per matrix and version, so tied names in a state dict share storage as they did.
        """
        held = {"input": self._input, "head_weight": self._head_weight, "head_bias": self._head_bias}[which]
        trained = self._trained(which)
        key = (which, trained._version, held.param._version)
        if key not in self._full_cache:
            if len(self._full_cache) > 8:  # stale versions of the matrices
                self._full_cache.clear()
            full = held.param.detach().clone()
            full.index_copy_(0, self.used_ids.to(full.device), trained.detach().to(full))
            self._full_cache[key] = full
        return self._full_cache[key]

    def _trained(self, which: str) -> nn.Parameter:
        if which == "input":
            return self._module(self.embeddings[0][0]).weight
        head = self._module(self.heads[0][0])
        return head.weight if which == "head_weight" else head.bias

    def _module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


def get_handle(model: nn.Module) -> PemaHandle | None:
    """The handle of a compacted model, or None."""
    return getattr(model, _HANDLE_ATTR, None)


def _trainable_stats(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, AdamW training-state bytes = weight + gradient + 2 moments, in the param dtype)."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() deduplicates tied ones
    return sum(p.numel() for p in params), sum(4 * p.numel() * p.element_size() for p in params)


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__)


def _input_embedding(model: nn.Module) -> nn.Embedding:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is None:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings() returned none); "
            f"pema_triton compacts models whose input embedding is an nn.Embedding"
        )
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModuleError(
            f"the input embedding {_module_path(model, embedding)!r} of {type(model).__name__} is a "
            f"{type(embedding).__name__}, not an nn.Embedding (or subclass); pema_triton cannot compact it"
        )
    return embedding


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None


def _holders(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) slot that holds `param`, each module once."""
    return [
        (module, name)
        for module in model.modules()
        for name, p in module._parameters.items()
        if p is param
    ]


def _missing_special_ids(model: nn.Module, used: torch.Tensor, vocab_size: int, tokenizer) -> dict[str, int]:
    """Special token ids the model or tokenizer names that `used` lacks."""
    named = {}
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None), tokenizer):
        for name in ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(source, name, None) if source is not None else None
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(i, int) and i >= 0:
                    named.setdefault(name, i)
    used_set = set(used.tolist())
    return {name: i for name, i in named.items() if i not in used_set and i < vocab_size}


def replace_embeddings(
    model: nn.Module,
    used_ids: torch.Tensor | Iterable[int],
    *,
    output: str | bool = "frozen",
    offload: str | torch.device | None = "cpu",
    backend: str = "auto",
    deterministic: bool | None = None,
    check_ids: bool = True,
    tokenizer=None,
) -> PemaHandle:
    """Compacts `model`'s input embedding (and output embedding) to the rows of `used_ids`, in place.

    Args:
        model: a Hugging Face model (anything with `get_input_embeddings()`, optionally
            `get_output_embeddings()`), whose embeddings are `nn.Embedding` / `nn.Linear` or subclasses.
        used_ids: [U] sorted unique token ids to keep, e.g. from :func:`pema_triton.scan_vocabulary`.
        output: what happens to the output embedding (LM head):
            "frozen": full-vocabulary logits, bit-identical to the original model's; unused rows frozen.
            "restricted": logits over the U used ids only (a softmax over the used vocabulary).
            False: the head is left alone. A model whose head is tied to the input embedding raises, since
            compacting one side would untie them.
        offload: where the full original matrices wait until restore ("cpu"), or None to leave them where
            they are. A `frozen` head keeps its own [V, D] copy on the model's device: it needs the unused rows.
        backend, deterministic, check_ids: passed to every :class:`CompactEmbedding`.
        tokenizer: optional; its pad / unk / bos / eos ids missing from `used_ids` are warned about.

    Returns:
        a :class:`PemaHandle` (also kept on the model) with the sizes before and after, and `restore()`.

    Raises:
        AlreadyCompactedError: the model is compacted already.
        UnsupportedModuleError: no input embedding, or an embedding / head of an unsupported type (named).
        UsedIdsError: `used_ids` not sorted unique ids in [0, V).
        PemaError: `output=False` on a tied model, or a bad `output`.
        On any error the model is left exactly as it was.

    Examples:
        >>> used = scan_vocabulary(dataset, len(tokenizer), keep=special_token_ids(tokenizer))
        >>> handle = replace_embeddings(model, used)              # train as usual, then:
        >>> restore_embeddings(model)
    """
    if get_handle(model) is not None:
        raise AlreadyCompactedError(
            f"{type(model).__name__} is already compacted ({get_handle(model)!r}); call restore_embeddings first"
        )
    if output not in OUTPUT_MODES:
        raise PemaError(f"output must be one of {OUTPUT_MODES}, got {output!r}")

    embedding = _input_embedding(model)
    input_weight = embedding.weight
    vocab_size, dim = input_weight.shape
    used_host = check_used_ids(used_ids, vocab_size)
    used = used_host.to(input_weight.device)

    holders = _holders(model, input_weight)
    foreign = [(m, n) for m, n in holders if not isinstance(m, (nn.Embedding, nn.Linear)) or n != "weight"]
    if foreign:
        module, name = foreign[0]
        raise UnsupportedModuleError(
            f"the input embedding matrix is also held as {_module_path(model, module)}.{name} "
            f"({type(module).__name__}); pema_triton can only compact nn.Embedding and nn.Linear holders"
        )
    embeddings = [m for m, _ in holders if isinstance(m, nn.Embedding)]
    tied_heads = [m for m, _ in holders if isinstance(m, nn.Linear)]
    head = _output_embedding(model)
    tied = bool(tied_heads)

    heads: list[nn.Linear] = []
    head_weight = head_bias = None
    if output is False:
        if tied:
            raise PemaError(
                f"output=False would compact the input embedding but not {_module_path(model, tied_heads[0])!r}, "
                f"which is tied to it, silently untying them; use output='frozen' (same logits) or 'restricted'"
            )
    elif head is not None:
        if not isinstance(head, nn.Linear):
            raise UnsupportedModuleError(
                f"the output embedding {_module_path(model, head)!r} is a {type(head).__name__}, not an nn.Linear; "
                f"use output=False to compact the input embedding alone"
            )
        if head.weight.shape != (vocab_size, dim):
            raise UnsupportedModuleError(
                f"the output embedding has shape {tuple(head.weight.shape)}, the input embedding {(vocab_size, dim)}; "
                f"pema_triton needs one vocabulary for both (or output=False)"
            )
        head_weight, head_bias = head.weight, head.bias
        heads = tied_heads if tied else [m for m, _ in _holders(model, head_weight) if isinstance(m, nn.Linear)]
        if head not in heads:
            raise UnsupportedModuleError(f"could not find the module holding {_module_path(model, head)!r}'s weight")
    elif tied_heads:
        raise UnsupportedModuleError(
            f"{_module_path(model, tied_heads[0])!r} holds the input embedding matrix but the model names no "
            f"output embedding; use output=False only on untied models"
        )

    missing = _missing_special_ids(model, used_host, vocab_size, tokenizer)
    if missing:
        warnings.warn(
            f"used_ids lack special tokens {missing}; a batch holding one will raise UnusedIdError. Keep them with "
            f"scan_vocabulary(..., keep=special_token_ids(tokenizer)) unless your data never contains them",
            PemaWarning,
            stacklevel=2,
        )

    params_before, bytes_before = _trainable_stats(model)
    handle = PemaHandle(model=model, output=output, vocab_size=vocab_size, used_ids=used, tied=tied)
    # A model on the meta device (sizes without memory, e.g. for planning) has no values to probe or offload.
    on_meta = input_weight.is_meta
    probe_ids = used[: _PROBE_IDS]
    probe_hidden = torch.randn(2, dim, generator=torch.Generator().manual_seed(0)).to(input_weight)
    with torch.no_grad():
        expected_embeddings = [] if on_meta else [m(probe_ids) for m in embeddings]
        expected_logits = [] if on_meta else [h(probe_hidden) for h in heads]

    try:
        _convert(model, handle, used_host, embeddings, heads, head_weight, head_bias, backend, deterministic, check_ids)
        if not on_meta:
            _probe(model, handle, embeddings, heads, probe_ids, probe_hidden, expected_embeddings, expected_logits)
        if output == "restricted":
            _restrict(model, handle)
        elif hasattr(model, "generate"):
            model.generate = _with_frozen_unused_rows(handle, model.generate)
        _register_checkpoint_hooks(model, handle)
    except BaseException:
        _undo(model, handle, merge=False)
        raise

    for held in (handle._input, handle._head_weight, handle._head_bias):
        if held is not None and offload is not None and not on_meta:
            held.param.data = held.param.data.to(offload)
    handle.params_after, handle.state_bytes_after = _trainable_stats(model)
    handle.params_before, handle.state_bytes_before = params_before, bytes_before
    setattr(model, _HANDLE_ATTR, handle)
    logger.info("compacted %s: %r", type(model).__name__, handle)
    return handle


def _convert(model, handle, used, embeddings, heads, head_weight, head_bias, backend, deterministic, check_ids):
    """Converts the holders in place, recording each in `handle` as it goes so a failure can be undone.

    `used` stays on the host: each module validates it there and moves it to its own device.
    """
    handle._input = _Held(embeddings[0].weight, embeddings[0].weight.device)
    weight = remap = None
    for module in embeddings:
        original_class = type(module)
        CompactEmbedding.convert_(
            module, used, backend=backend, deterministic=deterministic, check_ids=check_ids, weight=weight, remap=remap
        )
        handle.embeddings.append((_module_path(model, module), original_class))
        weight, remap = module.weight, module.remap
    if not heads:
        return
    if not handle.tied:
        handle._head_weight = _Held(head_weight, head_weight.device)
        weight = None
    if head_bias is not None:
        handle._head_bias = _Held(head_bias, head_bias.device)
        # Other slots sharing the bias (BERT's `cls.predictions.bias` is its decoder's bias) must follow it.
        handle._bias_aliases = [(m, n) for m, n in _holders(model, head_bias) if m not in heads]
    bias = None
    for module in heads:
        original_class = type(module)
        CompactLMHead.convert_(module, used, handle.output, weight=weight, bias=bias)
        handle.heads.append((_module_path(model, module), original_class))
        weight, bias = module.weight, module.bias
    for module, name in handle._bias_aliases:
        module._parameters[name] = bias


def _probe(model, handle, embeddings, heads, probe_ids, probe_hidden, expected_embeddings, expected_logits):
    """Each converted module must reproduce its original on a few used ids: catches a subclass whose forward
    bypasses nn.Embedding.forward / nn.Linear.forward (it would read the wrong rows without an error)."""
    columns = torch.arange(handle.num_used, device=probe_hidden.device)
    with torch.no_grad():
        for module, expected, (path, cls) in zip(embeddings, expected_embeddings, handle.embeddings):
            if not torch.equal(module(probe_ids), expected):
                raise UnsupportedModuleError(
                    f"{path!r} ({cls.__name__}) gives different embeddings once compacted: its forward does not "
                    f"go through nn.Embedding.forward, so pema_triton cannot compact it"
                )
        for module, expected, (path, cls) in zip(heads, expected_logits, handle.heads):
            got = module(probe_hidden)
            want = expected if handle.output == "frozen" else expected.index_select(-1, handle.used_ids)
            close = torch.equal(got, want) if handle.output == "frozen" else torch.allclose(got, want, atol=1e-4)
            if not close or (handle.output == "restricted" and got.shape[-1] != columns.numel()):
                raise UnsupportedModuleError(
                    f"{path!r} ({cls.__name__}) gives different logits once compacted: its forward does not go "
                    f"through nn.Linear.forward, so pema_triton cannot compact it"
                )


def _restrict(model, handle):
    """`restricted` mode around the head: vocab size in the config, logit biases, labels, generate()."""
    used, vocab_size = handle.used_ids, handle.vocab_size
    # Logit biases added after the head (BART's `final_logits_bias` [1, V]) must shrink with the logits.
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if name.endswith("logits_bias") and buffer is not None and buffer.shape[-1] == vocab_size:
                handle._logit_buffers.append((module, name, buffer))
                module._buffers[name] = buffer.index_select(-1, used.to(buffer.device))
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "get_text_config", lambda: None)()] if config is not None else []
    for cfg in {id(c): c for c in configs if c is not None and getattr(c, "vocab_size", None) == vocab_size}.values():
        cfg.vocab_size = handle.num_used
        handle._vocab_configs.append(cfg)

    def remap_labels(module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is None:
            return None
        if getattr(getattr(module, "config", None), "is_encoder_decoder", False) and kwargs.get(
            "decoder_input_ids"
        ) is None and hasattr(module, "prepare_decoder_input_ids_from_labels"):
            # Decoder inputs come from the labels in *original* ids, before the labels become compact columns.
            kwargs["decoder_input_ids"] = module.prepare_decoder_input_ids_from_labels(labels=labels)
        # The table is read at each call: `model.to("cuda")` after replace puts a new tensor in the buffer.
        remap = handle._module(handle.embeddings[0][0]).remap
        kwargs["labels"] = remap_labels_to_columns(labels, remap.to(labels.device))
        return args, kwargs

    handle._hooks.append(model.register_forward_pre_hook(remap_labels, with_kwargs=True))
    for method in ("generate", "save_pretrained"):
        if hasattr(model, method):
            setattr(model, method, _with_full_vocabulary(handle, getattr(model, method)))


def _with_full_vocabulary(handle, method):
    """Runs `method` with V-column logits and `config.vocab_size = V`, then goes back to restricted.

    generate() picks argmax / samples over logit columns and feeds the picks back as input ids, so it must see V
    columns indexed by original ids (unused ids get the lowest logit and are never chosen); save_pretrained
    writes full-vocabulary tensors, so its config must say V too.
    """

    def wrapper(*args, **kwargs):
        heads = [handle._module(path) for path, _ in handle.heads]
        for head in heads:
            head.expand_output = True
        for cfg in handle._vocab_configs:
            cfg.vocab_size = handle.vocab_size
        try:
            return method(*args, **kwargs)
        finally:
            for head in heads:
                head.expand_output = False
            for cfg in handle._vocab_configs:
                cfg.vocab_size = handle.num_used

    return wrapper


def _with_frozen_unused_rows(handle, generate):
    """Runs `generate` with the compacted embeddings able to embed unused ids (with their frozen rows).

    With full-vocabulary logits (`frozen`, or an untouched head) generation may pick an id the data never used;
    the model it stands for (full fine-tuning with the unused rows frozen) embeds it with its unchanged row.
    Tied `frozen` heads hold every row on the device already; otherwise the rows come from the kept original
    matrix (on the CPU when offloaded: a few rows a step).
    """

    def wrapper(*args, **kwargs):
        heads = [handle._module(path) for path, _ in handle.heads]
        source = heads[0].full_weight if handle.tied and heads else handle._input.param.data
        embeddings = [handle._module(path) for path, _ in handle.embeddings]
        for embedding in embeddings:
            embedding.unused_rows = source
        try:
            return generate(*args, **kwargs)
        finally:
            for embedding in embeddings:
                embedding.unused_rows = None

    return wrapper


def remap_labels_to_columns(labels: torch.Tensor, remap: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Original-id labels -> compact column labels for `restricted` logits; `ignore_index` passes through.

    Raises:
        IdOutOfRangeError / UnusedIdError: a label outside [0, V) or not in the used set (naming the ids).
    """
    ignored = labels == ignore_index
    real = labels[~ignored]
    in_vocab = (real >= 0) & (real < remap.numel())
    if not bool(in_vocab.all()) or bool((remap[real[in_vocab]] < 0).any()):
        raise_for_bad_ids(real, remap, what="labels")
    columns = remap[torch.where(ignored, 0, labels)].to(labels.dtype)
    return torch.where(ignored, labels, columns)


def _register_checkpoint_hooks(model, handle):
    """Full-vocabulary tensors in and out of `state_dict` / `load_state_dict`, under the original names."""
    used = handle.used_ids

    def slots(module):
        if isinstance(module, CompactEmbedding):
            return [("weight", "input")]
        names = [("weight", "input" if handle.tied else "head_weight")]
        return names + ([("bias", "head_bias")] if module.bias is not None else [])

    def save_hook(module, state_dict, prefix, local_metadata, which_of=slots):
        for name, which in which_of(module):
            if prefix + name in state_dict:
                state_dict[prefix + name] = handle._full(which)

    def held_for(key, full, which):
        held = {"input": handle._input, "head_weight": handle._head_weight, "head_bias": handle._head_bias}[which]
        if full.shape != held.param.shape:
            raise VocabularySizeError(
                f"checkpoint tensor {key!r} has shape {tuple(full.shape)}, but this model was compacted from "
                f"{tuple(held.param.shape)} (V={handle.vocab_size:,}); it belongs to another vocabulary"
            )
        return held

    def check_every_shape(root, state_dict, prefix, *args):
        # Runs before any submodule loads: a wrong head must not leave the input matrix already overwritten.
        paths = {id(m): p for p, m in root.named_modules(remove_duplicate=False)}
        targets = [(path, slots(handle._module(path))) for path, _ in handle.embeddings + handle.heads]
        targets += [(paths[id(m)], alias_slots(name, m)) for m, name in handle._bias_aliases if id(m) in paths]
        for path, names in targets:
            for name, which in names:
                key = prefix + (f"{path}." if path else "") + name
                if key in state_dict:
                    held_for(key, state_dict[key], which)

    def load_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors, which_of=slots):
        for name, which in which_of(module):
            key = prefix + name
            if key not in state_dict:
                continue
            full = state_dict[key]
            held = held_for(key, full, which)
            with torch.no_grad():
                held.param.copy_(full)  # the checkpoint's unused rows become the ones restore puts back
                if isinstance(module, CompactLMHead) and module.mode == "frozen":
                    (module.full_weight if name == "weight" else module.full_bias).copy_(full)
            state_dict[key] = full.index_select(0, used.to(full.device))  # what the compact Parameter loads

    def alias_slots(name, _module):
        return [(name, "head_bias")]

    handle._hooks.append(model.register_load_state_dict_pre_hook(check_every_shape))
    for path, _ in handle.embeddings + handle.heads:
        module = handle._module(path)
        handle._hooks.append(module.register_state_dict_post_hook(save_hook))
        handle._hooks.append(module.register_load_state_dict_pre_hook(load_hook))
    for module, name in handle._bias_aliases:
        which_of = functools.partial(alias_slots, name)
        handle._hooks.append(module.register_state_dict_post_hook(functools.partial(save_hook, which_of=which_of)))
        handle._hooks.append(module.register_load_state_dict_pre_hook(functools.partial(load_hook, which_of=which_of)))
    for module, name, original in handle._logit_buffers:
        def restore_buffer(m, sd, prefix, lm, name=name, original=original):
            if prefix + name in sd:
                sd[prefix + name] = original

        def shrink_buffer(m, sd, prefix, lm, s, mi, u, e, name=name, original=original):
            if prefix + name in sd:
                with torch.no_grad():
                    original.copy_(sd[prefix + name])
                sd[prefix + name] = original.index_select(-1, used.to(original.device))

        handle._hooks.append(module.register_state_dict_post_hook(restore_buffer))
        handle._hooks.append(module.register_load_state_dict_pre_hook(shrink_buffer))


def restore_embeddings(model: nn.Module) -> nn.Module:
    """Merges the trained rows back into the full matrices and puts the original modules' classes back.

    Unused rows come back bit-identical to before `replace_embeddings` (or to the last full checkpoint loaded
    while compacted); ties, `config.vocab_size` and `generate` are as they were.

    Raises:
        NotCompactedError: the model was not compacted by `replace_embeddings`.
    """
    handle = get_handle(model)
    if handle is None:
        raise NotCompactedError(f"{type(model).__name__} is not compacted: there is nothing to restore")
    _undo(model, handle, merge=True)
    delattr(model, _HANDLE_ATTR)
    return model


def _undo(model, handle, merge):
    """Reverts whatever `handle` records, in reverse order; with `merge`, trained rows land in the full matrices."""
    for hook in handle._hooks:
        hook.remove()
    handle._hooks.clear()
    for method in ("generate", "save_pretrained"):
        model.__dict__.pop(method, None)
    for cfg in handle._vocab_configs:
        cfg.vocab_size = handle.vocab_size
    for module, name, original in handle._logit_buffers:
        module._buffers[name] = original
    # The full matrices go back to the device and dtype the model has now (`model.to(...)` after replace moved
    # only the compact Parameters), as `.to()` would have converted the uncompacted model; else where they were.
    current = {}
    for which, paths in (("input", handle.embeddings), ("head", handle.heads)):
        if paths:
            weight = handle._module(paths[0][0]).weight
            current[which] = {"device": weight.device, "dtype": weight.dtype}
    for which, held in (("input", handle._input), ("head", handle._head_weight), ("head", handle._head_bias)):
        if held is not None:
            held.param.data = held.param.data.to(**current.get(which, {"device": held.device}))

    heads = [handle._module(path) for path, _ in handle.heads]
    if merge and heads:
        held_weight = handle._input if handle.tied else handle._head_weight
        bias = handle._head_bias.param.data if handle._head_bias is not None else None
        heads[0].merge_into(held_weight.param.data, bias)
    for module, (_, original_class) in zip(heads, handle.heads):
        full_weight = handle._input.param if handle.tied else handle._head_weight.param
        module.uncompact_(full_weight, handle._head_bias.param if handle._head_bias else None, original_class)
    for module, name in handle._bias_aliases:
        module._parameters[name] = handle._head_bias.param

    embeddings = [handle._module(path) for path, _ in handle.embeddings]
    if merge and embeddings:
        embeddings[0].merge_into(handle._input.param.data)
    for module, (_, original_class) in zip(embeddings, handle.embeddings):
        module.uncompact_(handle._input.param, original_class)
    handle._full_cache.clear()

