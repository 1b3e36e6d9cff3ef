"""`save_trimmed`: a fine-tuned model and its tokenizer, cut to the token ids they need, as a standard Hugging Face
model directory (plain transformers loads it; pema_triton is not needed to run it).

The model side: the input embedding and the output head (tied or not, with any logit bias) keep only the kept rows,
renumbered in the kept order (new id i = original id `kept[i]`), `config.vocab_size` and the configs' special token
ids follow. The rows come from the model's state dict, which for a compacted model already holds the full merged
matrices (see :mod:`pema_triton.checkpoint`), so the user's model is read, never changed. The tokenizer side is
:mod:`pema_triton.tokenizer_trim`.

Everything is written into a temporary directory beside `save_directory` and renamed into place at the end, so a
failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .distributed import main_process_logger
from .errors import PemaError, SaveDirectoryError, UnsupportedModuleError, UsedIdsError, VocabularySizeError
from .handle import get_handle
from .ops.remap import validate_used_ids
from .tokenizer_trim import TokenizerJson, kept_token_ids, write_trimmed_tokenizer
from .wrappers import inner_model, is_peft_model

logger = main_process_logger(__name__)

__all__ = ["save_trimmed"]


def save_trimmed(
    model: nn.Module,
    tokenizer,
    save_directory,
    *,
    used_ids=None,
    counts: torch.Tensor | None = None,
    min_count: int | None = None,
    max_vocab: int | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """Writes `model` and `tokenizer`, trimmed to the used token ids, as a Hugging Face model directory.

    The kept ids are the used ids, the special ids of the tokenizer and the model's configs, and what the tokenizer
    needs so that every text behind the used ids tokenizes to the same tokens as before (see
    :func:`pema_triton.tokenizer_trim.kept_token_ids`): single characters for WordPiece, the byte tokens and the
    merge closure for BPE, the byte or character fallback for Unigram.

    Args:
        model: a Hugging Face model, compacted by `replace_embeddings` (its used ids are taken) or plain (pass
            `used_ids`). It is not changed.
        tokenizer: its fast tokenizer (WordPiece, BPE or Unigram `tokenizer.json`).
        save_directory: where to write; must not exist or be empty, unless `overwrite`.
        used_ids: sorted unique token ids the model must keep; only for a model that is not compacted.
        counts: [V'] int occurrence counts by id, V' <= V (`VocabularyScan(V, count=True)` after scanning the
            data, or `pema-triton trim`); needed by `min_count` and `max_vocab`.
        min_count: keep only the used ids the data holds at least this often (a rare token's text then splits into
            kept pieces: it still round-trips, with more tokens).
        max_vocab: keep the most frequent used ids, as many as fit with the special and fallback ids and the merge
            closure in K <= max_vocab ids. Both may be given: `min_count` first.
        overwrite: replace a non-empty `save_directory`.

    Returns:
        [K] int64 sorted original ids of the kept tokens: new id i is original id `kept[i]`.

    Raises:
        UnsupportedModuleError: a tokenizer it cannot trim, or a model without an input embedding.
        SaveDirectoryError: `save_directory` is not empty and `overwrite` is False.
        UsedIdsError: `used_ids` missing for a plain model, or given for a compacted one.
        VocabularySizeError: the tokenizer's special or fallback ids reach past the model's vocabulary, or
            `max_vocab` is below what every trimmed tokenizer keeps.

    Example:
        >>> kept = save_trimmed(model, tokenizer, "deploy/")                      # doctest: +SKIP
        >>> AutoModelForSequenceClassification.from_pretrained("deploy/")       # doctest: +SKIP
    """
    _refuse_wrappers(model)
    target = _save_target(save_directory, overwrite)
    vocab_size, used = _used_ids(model, used_ids)
    config_ids = _config_special_ids(model, vocab_size)
    kept = _kept_ids(tokenizer, used, config_ids, _counts(counts, vocab_size, min_count, max_vocab), min_count,
                     max_vocab)
    if kept[-1] >= vocab_size:
        raise VocabularySizeError(
            f"the tokenizer keeps ids up to {kept[-1]} (its special or fallback tokens), but the model's vocabulary "
            f"is [0, {vocab_size}); is this the model's tokenizer?")
    kept = torch.tensor(kept, dtype=torch.int64)
    _write_staged(target, lambda staging: _write_trimmed(model, tokenizer, vocab_size, kept, staging))
    logger.info("saved %s trimmed to %d of %d token ids in %s", type(model).__name__, len(kept), vocab_size, target)
    return kept


def _write_trimmed(model: nn.Module, tokenizer, vocab_size: int, kept: torch.Tensor, directory: Path) -> None:
    _trimmed_model(model, vocab_size, kept).save_pretrained(str(directory))
    write_trimmed_tokenizer(tokenizer, kept.tolist(), directory)


def _write_staged(target: Path, write) -> None:
    """`write(staging)` into a new folder beside `target`, renamed into place when done; on any failure the
    staging folder and the parents this created are removed, and `target` is as it was."""
    created = [p for p in target.parents if not p.exists()]  # removed again on failure, deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.trim-", dir=target.parent))
    try:
        write(staging)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()  # only if still empty: something else may have written there meanwhile
            except OSError:
                break
        raise


def _counts(counts, vocab_size: int, min_count, max_vocab) -> torch.Tensor | None:
    """`counts` as a [V] int64 CPU tensor, checked with the options that read it; None if no option does."""
    for name, value in (("min_count", min_count), ("max_vocab", max_vocab)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsedIdsError(f"{name} must be a positive int, got {value!r}")
    if min_count is None and max_vocab is None:
        return None
    if counts is None:
        raise UsedIdsError("min_count and max_vocab choose ids by frequency: pass counts= (a [V] tensor of "
                           "occurrences, e.g. VocabularyScan(V, count=True).counts after scanning the data)")
    counts = torch.as_tensor(counts).reshape(-1).cpu()
    if counts.is_floating_point() or counts.dtype == torch.bool or counts.numel() > vocab_size:
        raise UsedIdsError(f"counts must be integer occurrences of at most V = {vocab_size} ids, got "
                           f"{counts.numel()} of {counts.dtype}")
    return torch.cat([counts.to(torch.int64), counts.new_zeros(vocab_size - counts.numel(), dtype=torch.int64)])


def _kept_ids(tokenizer, used: torch.Tensor, config_ids: list[int], counts, min_count, max_vocab) -> list[int]:
    """The kept ids: the used ids (those seen `min_count` times, the `max_vocab` most frequent that fit) and what
    the tokenizer needs beside them (:func:`kept_token_ids`)."""
    if counts is None:
        return kept_token_ids(tokenizer, used.tolist(), extra=config_ids)
    if min_count is not None:
        used = used[counts[used] >= min_count]
    if max_vocab is None:
        return kept_token_ids(tokenizer, used.tolist(), extra=config_ids)
    by_count = used[torch.argsort(counts[used], descending=True, stable=True)].tolist()
    parsed = TokenizerJson(tokenizer)

    def kept_of(k: int) -> list[int]:
        return kept_token_ids(parsed, sorted(by_count[:k]), extra=config_ids)

    floor = kept_of(0)
    if len(floor) > max_vocab:
        raise VocabularySizeError(f"max_vocab={max_vocab} is below the {len(floor)} ids every trimmed copy of this "
                                  f"tokenizer keeps (its special ids and byte / character fallback)")
    # The kept set only grows with k (a superset's closure holds the subset's), so the largest k that fits is
    # found by bisection: about 16 closures for 30k used ids.
    low, high = 0, len(by_count)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if len(kept_of(middle)) <= max_vocab else (low, middle - 1)
    return kept_of(low)


def _refuse_wrappers(model: nn.Module) -> None:
    """save_trimmed writes one transformers model: a PEFT model's adapters or a SentenceTransformer's other modules
    (pooling, normalisation) would be lost or half written."""
    if is_peft_model(model):
        raise UnsupportedModuleError(
            "save_trimmed writes a plain transformers model; merge the adapters first and trim the merged model: "
            "save_trimmed(peft_model.merge_and_unload(), tokenizer, directory)")
    if inner_model(model) is not model:
        raise UnsupportedModuleError(
            f"save_trimmed writes a plain transformers model, not a {type(model).__name__} folder; trim its "
            "transformer (for a SentenceTransformer: save_trimmed(model[0].auto_model, model.tokenizer, directory)) "
            "and keep the other modules' files beside it")


def _save_target(save_directory, overwrite: bool) -> Path:
    """The absolute directory to write: empty or new unless `overwrite`, and never the working directory or one of
    its parents, which replacing (or renaming a staging folder into) would take the user's files with it."""
    target = Path(save_directory).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise SaveDirectoryError(f"save_directory {str(save_directory)!r} is the working directory or one of its "
                                 f"parents ({target}); name a new folder, e.g. {str(target / 'trimmed')!r}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise SaveDirectoryError(f"{str(save_directory)!r} exists and is not empty; pass overwrite=True to replace it")
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Renames the finished `staging` directory to `target`, replacing what `target` held."""
    if not target.exists():
        staging.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _used_ids(model: nn.Module, used_ids) -> tuple[int, torch.Tensor]:
    """(V of the original vocabulary, the validated used ids) of a compacted or plain model."""
    handle = get_handle(model)
    if handle is not None:
        if used_ids is not None and not torch.equal(validate_used_ids(used_ids, handle.vocab_size), handle.used_ids):
            raise UsedIdsError("this model is compacted: save_trimmed keeps its used ids (get_handle(model).used_ids); "
                               "pass used_ids only for a model that is not compacted")
        return handle.vocab_size, handle.used_ids
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModuleError(f"{type(model).__name__} has no nn.Embedding input embedding to trim")
    if used_ids is None:
        raise UsedIdsError("this model is not compacted: pass used_ids= (e.g. scan_vocabulary(...).used_ids)")
    return embedding.num_embeddings, validate_used_ids(used_ids, embedding.num_embeddings)


def _special_id_attrs(config) -> dict[str, object]:
    """The `*_token_id` entries of a (generation) config."""
    return {k: v for k, v in config.to_dict().items() if k.endswith("_token_id") and v is not None}


def _config_special_ids(model: nn.Module, vocab_size: int) -> list[int]:
    ids = set()
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for value in (_special_id_attrs(config) if config is not None else {}).values():
            ids.update(i for i in (value if isinstance(value, list) else [value])
                       if isinstance(i, int) and 0 <= i < vocab_size)
    return sorted(ids)


# Generation-config lists of token ids (flat, or of sequences) that name tokens by id.
_ID_LISTS, _ID_SEQUENCES = ("suppress_tokens", "begin_suppress_tokens"), ("bad_words_ids",)


def _remap_special_ids(config, new_id: dict[int, int]) -> None:
    """Renumbers a config's `*_token_id` entries (an id not kept becomes None) and its lists of token ids (a dropped
    id, or a sequence holding one, is left out: no text can produce it any more)."""
    for name, value in _special_id_attrs(config).items():
        if isinstance(value, list):
            setattr(config, name, [new_id[i] for i in value if i in new_id])
        elif isinstance(value, int):
            setattr(config, name, new_id.get(value))
    for name in _ID_LISTS:
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, [new_id[i] for i in getattr(config, name) if i in new_id])
    for name in _ID_SEQUENCES:
        if isinstance(getattr(config, name, None), list):
            kept = [[new_id[i] for i in seq] for seq in getattr(config, name)
                    if all(isinstance(i, int) and i in new_id for i in seq)]
            setattr(config, name, kept or None)


def _vocabulary_keys(model: nn.Module, state: dict, vocab_size: int) -> tuple[set[str], set[str]]:
    """State-dict keys whose rows (dim 0) are token ids, and keys of [..., V] logit biases (last dim)."""
    paths = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    slots = []
    for module, names in ((model.get_input_embeddings(), ("weight",)),
                          (model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None,
                           ("weight", "bias"))):
        if module is not None and id(module) in paths:
            slots += [f"{paths[id(module)]}.{n}".lstrip(".") for n in names]
    roots = {(state[k].data_ptr(), tuple(state[k].shape)) for k in slots
             if k in state and state[k].dim() >= 1 and state[k].shape[0] == vocab_size}
    rows = {k for k, t in state.items() if t.dim() >= 1 and (t.data_ptr(), tuple(t.shape)) in roots}
    biases = {k for k, t in state.items() if k.endswith("logits_bias") and t.dim() >= 1 and t.shape[-1] == vocab_size}
    return rows, biases


def _sliced_state(model: nn.Module, vocab_size: int, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's state dict (full matrices, for a compacted model) with the vocabulary rows cut to `kept`; tied
    entries stay one tensor."""
    state = model.state_dict()
    rows, biases = _vocabulary_keys(model, state, vocab_size)
    if not rows:
        raise UnsupportedModuleError(f"found no [V={vocab_size}, ...] input embedding in {type(model).__name__}'s "
                                     f"state dict to trim")
    sliced: dict[tuple[int, tuple], torch.Tensor] = {}
    out = dict(state)
    for key in sorted(rows | biases):
        tensor, dim = state[key], (0 if key in rows else -1)
        tag = (tensor.data_ptr(), tuple(tensor.shape), dim)
        if tag not in sliced:
            sliced[tag] = tensor.index_select(dim, kept.to(tensor.device)).clone()
        out[key] = sliced[tag]
    return out


def _trimmed_model(model: nn.Module, vocab_size: int, kept: torch.Tensor) -> nn.Module:
    """A new model of `model`'s class with `config.vocab_size` = K and the sliced state; shares the other tensors
    with `model` (read only)."""
    state = _sliced_state(model, vocab_size, kept)
    new_id = {old: new for new, old in enumerate(kept.tolist())}
    config = copy.deepcopy(model.config)
    config.vocab_size = len(kept)
    for name in ("quantization_config",):  # a GGUF / quantized load's flag; the tensors here are plain
        if hasattr(config, name):
            delattr(config, name)
    _remap_special_ids(config, new_id)
    with torch.device("meta"):
        trimmed = type(model)(config)
    try:
        trimmed.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has vocabulary-sized tensors save_trimmed does not know how to cut: {err}"
        ) from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False):
        trimmed.tie_weights()
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(trimmed, "generation_config", None) is not None:
        trimmed.generation_config = copy.deepcopy(generation)
        _remap_special_ids(trimmed.generation_config, new_id)
    rows = trimmed.get_input_embeddings().weight.shape[0]
    if rows != len(kept):
        raise PemaError(f"{type(model).__name__}'s input embedding has {rows} rows after setting config.vocab_size = "
                        f"{len(kept)}; its vocabulary size lives elsewhere")
    return trimmed.eval()
