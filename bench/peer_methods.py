"""The five ways bench/peers.py fine-tunes one model: each method's own code path, from data to a merged model.

Every method gets the same tokenized BBC News (a `datasets.Dataset` padded to max_length, as upstream PEMA's
example tokenizes) and returns the batches it trains on plus a `finish()` that merges back and returns a plain
full-vocabulary model. Set-up (the method's scan and compaction, plus any data or tokenizer rewriting) and
finish are timed by the caller.

- `full`: plain full fine-tuning, the reference.
- `pema_triton`: `scan_vocabulary` + `replace_embeddings`; trains on the original ids; `restore_embeddings`.
- `tstv`: transformer-smaller-training-vocab 0.4.2's `reduce_train_vocab_and_context` / `recreate_vocab` (what its
  `reduce_train_vocab` context manager calls); it rewrites the tokenizer, so the texts are tokenized again.
- `peft`: PEFT's trainable tokens (`TrainableTokensConfig(token_indices=used ids)`), the rest of the model
  unfrozen by hand so that it trains as in full fine-tuning; `merge_and_unload()`.
- `upstream`: upstream PEMA (Williams & Aletras) reimplemented from its published description: counts with a
  numpy-formatted `datasets.map` + `np.bincount`, rewrites the dataset's ids to compact ids, refuses a pad token
  that would change id, swaps in a U-row `nn.Embedding` weight, keeps the full matrix in a temporary file,
  merges back at the end.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scan_cases import upstream_counts

NAMES = {"full": "full fine-tuning", "pema_triton": "pema_triton", "tstv": "TSTV 0.4.2",
         "peft": "PEFT trainable tokens", "upstream": "upstream PEMA (reimplemented)"}
# What a user of each method must change in a training script that already works with full fine-tuning.
REWRITES = {
    "full": "nothing (the reference)",
    "pema_triton": "nothing: two calls around the loop (replace_embeddings, restore_embeddings)",
    "tstv": "the tokenizer (rewritten in place): pre-tokenized data must be tokenized again inside the context",
    "peft": "the model (wrapped); the rest of the model is frozen by default and must be unfrozen; a delta to merge",
    "upstream": "the dataset (every id rewritten to a compact id); the pad token must be in the scanned data",
}


@dataclass
class Prepared:
    model: torch.nn.Module  # what trains (PEFT's wrapper; else the model itself)
    batches: list[dict]
    finish: Callable[[], torch.nn.Module]
    rows: int | None = None  # embedding rows that train (U); None: all V
    notes: list[str] = field(default_factory=list)


def tokenize(tokenizer, texts, labels, max_length):
    """The training data as every method but TSTV receives it: a `datasets.Dataset`, padded to max_length."""
    import datasets

    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return datasets.Dataset.from_dict({**enc, "labels": list(labels)})


def batches_of(columns: dict, batch_size: int) -> list[dict]:
    """Fixed-order batches of tensors from columns of equal-length rows (no shuffling: the same order for all)."""
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in columns.items()}
    n = len(tensors["labels"])
    return [{k: t[i : i + batch_size] for k, t in tensors.items()} for i in range(0, n, batch_size)]


def _columns(dataset) -> dict:
    return {name: dataset[name] for name in dataset.column_names}


def full(model, tokenizer, data, cfg) -> Prepared:
    return Prepared(model, batches_of(_columns(data["dataset"]), cfg["batch_size"]), lambda: model)


def pema_triton(model, tokenizer, data, cfg) -> Prepared:
    from pema_triton import replace_embeddings, resolve_backend, restore_embeddings, scan_vocabulary, special_token_ids

    used = scan_vocabulary(data["dataset"], len(tokenizer), keep=special_token_ids(tokenizer), progress=False)
    replace_embeddings(model, used)

    def finish():
        restore_embeddings(model)
        return model

    backend = resolve_backend("auto", model.device)  # "torch" on a CPU: the Triton kernels need a GPU here
    return Prepared(model, batches_of(_columns(data["dataset"]), cfg["batch_size"]), finish, rows=len(used),
                    notes=[f"backend {backend!r} (`resolve_backend('auto', {model.device.type!r})`)"])


def tstv_bert_setter_fix() -> str | None:
    """TSTV 0.4.2 registers a slow-tokenizer setter for `BertTokenizer` (it assigns `tokenizer.vocab`); on
    transformers 5 `BertTokenizer` is the fast (tokenizers-backed) class, where that fails with "property 'vocab'
    of 'BertTokenizer' object has no setter". Registering TSTV's own fast-tokenizer setter (which rewrites the
    tokenizer.json model) for `BertTokenizer` makes it run. Returns what was done, or None where not needed."""
    from transformer_smaller_training_vocab.transformer_set_vocab import register_set_vocab, set_fast_tokenizer_vocab
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    if not issubclass(BertTokenizer, PreTrainedTokenizerFast):
        return None
    register_set_vocab(BertTokenizer)(set_fast_tokenizer_vocab)
    return "register_set_vocab(BertTokenizer)(set_fast_tokenizer_vocab)"


def tstv(model, tokenizer, data, cfg) -> Prepared:
    from transformer_smaller_training_vocab import recreate_vocab, reduce_train_vocab_and_context

    fix = tstv_bert_setter_fix()
    context = reduce_train_vocab_and_context(model, tokenizer, data["texts"])
    # The tokenizer now maps text to compact ids: the data tokenized before is stale and is tokenized again.
    dataset = tokenize(tokenizer, data["texts"], data["labels"], cfg["max_length"])
    notes = [f"transformers 5 fix applied in the bench: `{fix}`"] if fix else []

    def finish():
        recreate_vocab(model, tokenizer, *context)
        embedding = model.get_input_embeddings()
        if embedding.padding_idx is None and tokenizer.pad_token_id is not None:
            notes.append(f"after recreate_vocab the input embedding's padding_idx is None (it was "
                         f"{tokenizer.pad_token_id}): the pad row is no longer shielded from gradients in later "
                         "training (here no pad position reached the loss, so the weights still match)")
        return model

    return Prepared(model, batches_of(_columns(dataset), cfg["batch_size"]), finish, rows=len(context[0]),
                    notes=notes)


def peft(model, tokenizer, data, cfg) -> Prepared:
    from peft import TrainableTokensConfig, get_peft_model

    # The user finds the ids; torch.unique over the id column is the plain way.
    used = torch.unique(torch.as_tensor(np.asarray(data["dataset"]["input_ids"]))).tolist()
    wrapped = get_peft_model(model, TrainableTokensConfig(token_indices=used))
    embedding = wrapped.get_input_embeddings()
    frozen = {id(p) for name, p in embedding.named_parameters() if "trainable_tokens" not in name}
    for p in wrapped.parameters():  # PEFT freezes the base model; full fine-tuning trains all of it
        if id(p) not in frozen:
            p.requires_grad_(True)
    return Prepared(wrapped, batches_of(_columns(data["dataset"]), cfg["batch_size"]), wrapped.merge_and_unload,
                    rows=len(used))


def upstream_prepare(model, tokenizer, dataset):
    """Upstream's prepare: count, rewrite the ids, check the pad token, prune. Returns (rewritten dataset,
    selected ids, restore function). Raises ValueError where the pad token would change id, as upstream does."""
    counts = upstream_counts(dataset, len(tokenizer))
    selected = np.flatnonzero(counts)
    token_map = np.full(len(counts), -1, dtype=np.int64)  # -1: an unused id (upstream's UNUSED_TOKEN_ID)
    token_map[selected] = np.arange(len(selected))

    def rewrite(batch):
        return {"input_ids": token_map[batch["input_ids"]]}

    dataset = dataset.with_format("numpy").map(rewrite, batched=True, batch_size=1000, keep_in_memory=True,
                                               load_from_cache_file=False)
    dataset.reset_format()
    pad = tokenizer.pad_token_id
    if pad is not None and token_map[pad] != pad:
        raise ValueError("Reassigning `pad_token` is not yet supported.")
    embedding = model.get_input_embeddings()
    kept_file = tempfile.TemporaryFile()  # upstream keeps the full matrix in a temporary file until restore
    torch.save(embedding.weight.detach(), kept_file)
    index = torch.from_numpy(selected)
    with torch.no_grad():
        embedding.weight = torch.nn.Parameter(embedding.weight[index].clone())
    embedding.num_embeddings = len(index)

    def restore():
        kept_file.seek(0)
        weight = torch.load(kept_file)
        with torch.no_grad():
            weight[index] = embedding.weight
        embedding.weight = torch.nn.Parameter(weight)
        embedding.num_embeddings = len(weight)
        kept_file.close()
        return model

    return dataset, selected, restore


def upstream(model, tokenizer, data, cfg) -> Prepared:
    import datasets

    notes = []
    try:
        rewritten, selected, restore = upstream_prepare(model, tokenizer, data["dataset"])  # the data as it is
    except ValueError as error:
        notes.append(f"on the training data alone upstream raises `ValueError: {error}` (max_length "
                     f"{cfg['max_length']} truncates every article, so no [PAD] is in the data); the bench adds a "
                     "one-row split of padding to the scanned DatasetDict, so pad keeps id 0")
        pad_row = tokenize(tokenizer, [""], [0], cfg["max_length"])
        rewritten, selected, restore = upstream_prepare(
            model, tokenizer, datasets.DatasetDict({"train": data["dataset"], "pad": pad_row}))
        rewritten = rewritten["train"]
    return Prepared(model, batches_of(_columns(rewritten), cfg["batch_size"]), restore, rows=len(selected),
                    notes=notes)


METHODS = {"full": full, "pema_triton": pema_triton, "tstv": tstv, "peft": peft, "upstream": upstream}
