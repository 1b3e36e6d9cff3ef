"""`replace_embeddings` / `restore_embeddings`: compact a model's input and output embeddings in place.

Orchestration only: find every module holding the matrices, validate the used ids once, convert each holder,
probe that it still computes what it did, and let the output mode patch the model. The handle
(:mod:`pema_triton.handle`) records each step so that a failure part-way leaves the model as it was.

Works at the level of Parameters, because that is where models share: T5 and BART hold one embedding matrix in
three `nn.Embedding` modules (shared, encoder, decoder), tied LM heads hold it in an `nn.Linear`, BERT-style heads
share their decoder bias with a second attribute. Every holder of the matrix is converted in place, all of them
to one compact Parameter, so what was tied stays tied, and module identity, hooks and embedding-subclass
behaviour (Gemma's and BART's `embed_scale`) are kept.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import FullVocabularyCheckpoint
from .distributed import check_same_used_ids, in_distributed_job, keep_buffers_out_of_ddp
from .embedding import CompactEmbedding
from .errors import AlreadyCompactedError, NotCompactedError, PemaError, UnsupportedModuleError
from .guards import refuse_vocabulary_changes
from .handle import KeptMatrix, PemaHandle, get_handle, trainable_stats
from .head import CompactLMHead
from .id_check import check_ids_option
from .model_patches import kept_matrices_follow_dtype, look_up_frozen_used_ids, wrap_method
from .modes import OutputMode, output_mode
from .ops.remap import Compaction
from .vocab import warn_missing_special_ids
from .wrappers import adopt_peft_model, check_embedding_wrappers, inner_model, peft_model_in, trained_module

__all__ = ["get_handle", "replace_embeddings", "restore_embeddings"]

# Ids probed after conversion: each converted module must give what the original gave on them.
_PROBE_IDS = 8


def replace_embeddings(
    model: nn.Module,
    used_ids: torch.Tensor | Iterable[int],
    *,
    output: str | None = "frozen",
    offload: str | torch.device | None = "cpu",
    backend: str = "auto",
    deterministic: bool | None = None,
    check_ids: bool | str = True,
    fused_loss: bool = False,
    trainable_ids: torch.Tensor | Iterable[int] | None = None,
    tokenizer=None,
    process_group=None,
) -> PemaHandle:
    """Compacts `model`'s input embedding (and output embedding) to the rows of `used_ids`, in place.

    Args:
        model: a Hugging Face model (with `get_input_embeddings()`, optionally `get_output_embeddings()`) whose
            embeddings are `nn.Embedding` / `nn.Linear` or subclasses, or a PEFT / sentence-transformers wrapper
            around one (:mod:`pema_triton.wrappers`; under PEFT the compact rows are made trainable).
        used_ids: [U] sorted unique token ids to keep, e.g. from :func:`pema_triton.scan_vocabulary`.
        output: what happens to the output embedding (LM head), see :mod:`pema_triton.modes`:
            "frozen": full-vocabulary logits, bit-identical to the original model's; unused rows frozen.
            "restricted": logits over the U used ids only (a softmax over the used vocabulary).
            None: the head is left alone (a head tied to the input embedding raises: it would be untied).
        offload: where the full matrices wait until restore ("cpu"), or None (a `frozen` head keeps a [V, D] copy).
        backend, deterministic, check_ids: passed to every :class:`CompactEmbedding` (:mod:`pema_triton.id_check`).
        fused_loss: with `labels`, the causal-LM loss computed with the head, no logits (:mod:`~.fused_loss`).
        trainable_ids: [T] sorted ids, a subset of `used_ids`, whose rows alone train (say, tokens added with
            `add_tokens`): the compact rows and their optimizer state are [T, D]; the other used ids embed (and, in
            "frozen", score) with frozen rows: full fine-tuning with the others frozen (`output=None`: all head rows).
        tokenizer: optional; its pad / unk / bos / eos ids missing from `used_ids` are warned about.
        process_group: in a `torch.distributed` job, the ranks that must pass the same used ids (default all).

    Returns: a :class:`PemaHandle` (also kept on the model): the sizes before and after, and `restore()`.
    Raises:
        AlreadyCompactedError: the model is compacted already.
        UnsupportedModuleError: no input embedding, or an embedding / head of an unsupported type (named).
        UsedIdsError: `used_ids` not sorted unique ids in [0, V), or `trainable_ids` not a subset of them.
        PemaError: `output=None` on a tied model, an unknown `output` or `check_ids`, `trainable_ids` with
            "restricted". On any error the model is left exactly as it was.

    Examples:
        >>> handle = replace_embeddings(model, scan_vocabulary(dataset, len(tokenizer), keep=special_token_ids(tok)))
    """
    _refuse_compacted(model)
    peft_model, model = peft_model_in(model), inner_model(model)  # pema_triton.wrappers
    check_ids_option(check_ids)
    mode = output_mode(output).fused if fused_loss else output_mode(output)
    targets = _Targets.find(model, mode)
    lookup, compaction = _compactions(used_ids, trainable_ids, targets.vocab_size, mode, process_group)
    warn_missing_special_ids(model, lookup, tokenizer)
    handle, stats_before = PemaHandle(model, compaction, mode, targets.tied), trainable_stats(model)
    handle.lookup = lookup
    _compact(handle, targets, _offload_device(offload), backend=backend, deterministic=deterministic,
             check_ids=check_ids)
    if peft_model is not None:
        adopt_peft_model(handle, peft_model)
    handle.finish(stats_before)
    return handle


def _compactions(used_ids, trainable_ids, vocab_size: int, mode: OutputMode, process_group
                 ) -> tuple[Compaction, Compaction]:
    """(the used ids, the trainable ids: the compact rows), validated, and the same on every rank."""
    lookup = Compaction.of(used_ids, vocab_size)
    _check_every_rank(lookup, process_group)
    if trainable_ids is None:
        return lookup, lookup
    if mode.logits_over_used_ids:
        raise PemaError("trainable_ids needs output='frozen' (or None): 'restricted' trains the head rows its "
                        "softmax runs over, all the used ids; compact with output='frozen' to train only some rows")
    trainable = lookup.subset(trainable_ids)
    return lookup, (lookup if trainable.num_used == lookup.num_used else trainable)  # all of them: the plain case


def _compact(handle: PemaHandle, targets: _Targets, offload: torch.device | None, **embedding_options) -> None:
    """Converts, probes, patches and offloads; on any failure undoes whatever was done, so the model is as it was."""
    probe = _Probe.record(targets, handle.compaction)
    try:
        _convert_embeddings(handle, targets.embeddings, **embedding_options)
        _convert_heads(handle, targets)
        probe.check(handle)
        handle.output_mode.patch_model(handle)
        refuse_vocabulary_changes(handle)
        wrappers_hook = handle.model.register_forward_pre_hook(functools.partial(check_embedding_wrappers, handle))
        handle.on_undo(wrappers_hook.remove)
        FullVocabularyCheckpoint(handle).register()
        keep_buffers_out_of_ddp(handle)
        wrap_method(handle, "_apply", functools.partial(kept_matrices_follow_dtype, handle))
        handle.offload(offload)
        if handle.lookup is not handle.compaction:
            look_up_frozen_used_ids(handle)  # after the offload: an untied input's frozen rows are read there
    except BaseException:
        handle.undo(merge=False)
        raise


def _offload_device(offload) -> torch.device | None:
    """`offload=` as a device that can hold the kept matrices, checked before the model is touched."""
    if offload is None:
        return None
    try:
        device = torch.device(offload)
        torch.empty(0, device=device)
    except Exception as err:  # a bad name (RuntimeError) or a device this build cannot reach (AssertionError)
        raise PemaError(f"offload={offload!r} is not a device this machine can use ({err}); "
                        f"use 'cpu' (the default) or None to keep the full matrices where they are") from None
    if device.type == "meta":
        raise PemaError("offload='meta' would drop the values of the full matrices, which restore needs; "
                        "use 'cpu' or None")
    return device


def _refuse_compacted(model: nn.Module) -> None:
    if get_handle(model) is not None:
        raise AlreadyCompactedError(
            f"{type(model).__name__} is already compacted ({get_handle(model)!r}); call restore_embeddings first"
        )


def _check_every_rank(compaction: Compaction, process_group) -> None:
    if in_distributed_job(process_group):
        check_same_used_ids(compaction.fingerprint, process_group)


def restore_embeddings(model: nn.Module) -> nn.Module:
    """Merges the trained rows back into the full matrices and puts the original modules back (see
    :meth:`PemaHandle.restore`). Returns `model` (a PEFT or sentence-transformers wrapper stays the wrapper).

    Raises:
        NotCompactedError: the model was not compacted by `replace_embeddings`.
    """
    handle = get_handle(model)
    if handle is None:
        raise NotCompactedError(f"{type(model).__name__} is not compacted: there is nothing to restore")
    handle.restore()
    return model


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__)


def _holders(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) slot that holds `param`, each module once."""
    return [(module, name) for module in model.modules() for name, p in module._parameters.items() if p is param]


def _get_embedding(model: nn.Module, getter: str) -> nn.Module | None:
    method = getattr(model, getter, None)
    try:
        return method() if method is not None else None
    except (NotImplementedError, AttributeError):
        return None


@dataclass
class _Targets:
    """The modules replace_embeddings converts: every holder of the input matrix and of the head's."""

    embeddings: list[nn.Embedding]
    heads: list[nn.Linear]
    head_weight: nn.Parameter | None
    head_bias: nn.Parameter | None
    tied: bool

    @property
    def vocab_size(self) -> int:
        return self.embeddings[0].weight.shape[0]

    @classmethod
    def find(cls, model: nn.Module, mode: OutputMode) -> _Targets:
        """Raises UnsupportedModuleError (naming the module) for anything that cannot be compacted."""
        embedding = _get_embedding(model, "get_input_embeddings")
        if embedding is not None:
            embedding = trained_module(model, embedding, _module_path(model, embedding))
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
        holders = _holders(model, embedding.weight)
        for module, name in holders:
            if not isinstance(module, (nn.Embedding, nn.Linear)) or name != "weight":
                raise UnsupportedModuleError(
                    f"the input embedding matrix is also held as {_module_path(model, module)}.{name} "
                    f"({type(module).__name__}); pema_triton can only compact nn.Embedding and nn.Linear holders"
                )
        tied_heads = [m for m, _ in holders if isinstance(m, nn.Linear)]
        mode.check_tied(_module_path(model, tied_heads[0]) if tied_heads else None)
        targets = cls([m for m, _ in holders if isinstance(m, nn.Embedding)], [], None, None, bool(tied_heads))
        if mode.compacts_head:
            targets._find_head(model, embedding.weight, tied_heads, mode)
        return targets

    def _find_head(self, model: nn.Module, input_weight: nn.Parameter, tied_heads: list[nn.Linear], mode) -> None:
        head = _get_embedding(model, "get_output_embeddings")
        if head is None:
            if tied_heads:
                raise UnsupportedModuleError(
                    f"{_module_path(model, tied_heads[0])!r} holds the input embedding matrix but the model names "
                    f"no output embedding; use output=None only on untied models"
                )
            return
        head = trained_module(model, head, _module_path(model, head), restricted=mode.logits_over_used_ids)
        if not isinstance(head, nn.Linear):
            raise UnsupportedModuleError(
                f"the output embedding {_module_path(model, head)!r} is a {type(head).__name__}, not an nn.Linear; "
                f"use output=None to compact the input embedding alone"
            )
        if head.weight.shape != input_weight.shape:
            raise UnsupportedModuleError(
                f"the output embedding has shape {tuple(head.weight.shape)}, the input embedding "
                f"{tuple(input_weight.shape)}; pema_triton needs one vocabulary for both (or output=None)"
            )
        self.head_weight, self.head_bias = head.weight, head.bias
        holders = tied_heads if self.tied else [m for m, _ in _holders(model, head.weight)]
        self.heads = [m for m in holders if isinstance(m, nn.Linear)]
        if head not in self.heads:
            raise UnsupportedModuleError(f"could not find the module holding {_module_path(model, head)!r}'s weight")


def _convert_embeddings(handle: PemaHandle, embeddings: list[nn.Embedding], **options) -> None:
    """Every holder of the input matrix onto one compact Parameter and one remap table."""
    handle.kept_input = KeptMatrix.of(embeddings[0].weight)
    weight = remap = None
    for module in embeddings:
        original_class = type(module)
        CompactEmbedding.convert_(module, handle.compaction, weight=weight, remap=remap, **options)
        handle.converted(module, original_class)
        weight, remap = module.weight, module.remap


def _convert_heads(handle: PemaHandle, targets: _Targets) -> None:
    """Every holder of the head's matrix onto one compact weight (the input's, if tied) and bias."""
    if not targets.heads:
        return
    weight = handle.embeddings[0].weight if targets.tied else None
    if not targets.tied:
        handle.kept_head_weight = KeptMatrix.of(targets.head_weight)
    if targets.head_bias is not None:
        handle.kept_head_bias = KeptMatrix.of(targets.head_bias)
        # Other slots sharing the bias (BERT's `cls.predictions.bias` is its decoder's bias) must follow it.
        handle.bias_aliases = [(m, n) for m, n in _holders(handle.model, targets.head_bias) if m not in targets.heads]
    bias = None
    for module in targets.heads:
        original_class = type(module)
        CompactLMHead.convert_(module, handle.compaction, handle.output_mode, weight=weight, bias=bias)
        handle.converted(module, original_class)
        weight, bias = module.weight, module.bias
    for module, name in handle.bias_aliases:
        module._parameters[name] = bias


@dataclass
class _Probe:
    """What the original modules give on a few used ids (and a random hidden state), recorded before conversion.

    Checked after it: catches a subclass whose forward bypasses nn.Embedding.forward / nn.Linear.forward (it would
    read the wrong rows without an error). A model on the meta device (sizes without values) is not probed.
    """

    ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    embeddings: tuple[torch.Tensor, ...] = ()
    logits: tuple[torch.Tensor, ...] = ()

    @classmethod
    @torch.no_grad()
    def record(cls, targets: _Targets, compaction: Compaction) -> _Probe:
        weight = targets.embeddings[0].weight
        if weight.is_meta:
            return cls()
        ids = compaction.used_ids[:_PROBE_IDS].to(weight.device)
        hidden = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
        return cls(ids, hidden, tuple(m(ids) for m in targets.embeddings), tuple(h(hidden) for h in targets.heads))

    @torch.no_grad()
    def check(self, handle: PemaHandle) -> None:
        if self.ids is None:
            return
        for module, expected in zip(handle.embeddings, self.embeddings):
            if not torch.equal(module(self.ids), expected):
                raise self._error(handle, module, "embeddings", "nn.Embedding.forward")
        mode = handle.output_mode
        for module, expected in zip(handle.heads, self.logits):
            if not mode.same_logits(module(self.hidden), mode.compacted_logits(expected, handle.compaction.used_ids)):
                raise self._error(handle, module, "logits", "nn.Linear.forward")

    @staticmethod
    def _error(handle: PemaHandle, module: nn.Module, what: str, forward: str) -> UnsupportedModuleError:
        original = handle.original_class(module).__name__
        return UnsupportedModuleError(
            f"{_module_path(handle.model, module)!r} ({original}) gives different {what} once compacted: its "
            f"forward does not go through {forward}, so pema_triton cannot compact it"
        )
