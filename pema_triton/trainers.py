"""`compact_trainer`: PEMA for a trainer someone already built (transformers' Trainer or TRL's SFT / DPO / KTO).

A trainer tokenizes its data in its constructor (TRL appends EOS, applies chat templates, truncates, splits DPO
pairs into prompt / chosen / rejected ids), so the ids it will feed exist only then: scanning them there is
scanning exactly what training sees. The optimizer does not exist until `train()`, so compacting between the two
loses nothing. TRL's forward, installed by then, reads `lm_head.weight` itself: replace_embeddings adapts it
(:mod:`pema_triton.fused_lm_head`).
"""

from __future__ import annotations

import torch

from .errors import PemaError
from .model_patches import embed_unused_ids
from .optim import set_embedding_lr
from .replace import replace_embeddings
from .vocab import scan_vocabulary, special_token_ids
from .wrappers import inner_model

__all__ = ["ID_COLUMNS", "compact_trainer", "trainer_used_ids"]

# Columns of token ids in the datasets trainers feed (transformers' and TRL's, after their tokenization).
ID_COLUMNS = ("input_ids", "labels", "completion_input_ids", "prompt_input_ids", "chosen_input_ids",
              "rejected_input_ids", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "answer_input_ids")


def compact_trainer(trainer, output: str = "frozen", *, fused_loss: bool = False, keep=(), columns=None,
                    embed_unscanned: bool = False, embedding_lr: float | None = None, callback: bool = True,
                    **options):
    """Compacts `trainer.model` to the ids of the trainer's datasets; call it after building the trainer and before
    `trainer.train()`.

    Scans every id column (:data:`ID_COLUMNS`, or `columns`) of the train and eval datasets as the trainer
    tokenized them (an online trainer's prompts, GRPO's and RLOO's, through its own prompt tokenization, chat
    template included), keeps the tokenizer's special ids and `keep`, runs :func:`replace_embeddings` on the
    trainer's model (a PeftModel the trainer built from `peft_config` included; it adapts TRL's forward to compute
    TRL's outputs with the compact head) and adds a :class:`~pema_triton.hf.PemaCallback` (`callback=False`: not).

    Online trainers generate completions whose ids nobody scanned. Choose: `embed_unscanned=True` (`frozen`) embeds
    such an id with its frozen row and scores it with its frozen head row, neither trained: exactly full fine-tuning
    with every row outside the scanned ids frozen, the rows a completion reaches outside them included; or
    `output="restricted"`, where generation only ever picks the U scanned ids (a softmax over them).

    Args:
        output, fused_loss, options: as :func:`replace_embeddings` (`backend`, `check_ids`, `offload`, ...).
        keep: more ids to keep (ids generation may produce that the data lacks).
        columns: the id columns to scan, instead of every one of :data:`ID_COLUMNS` the datasets have.
        embed_unscanned: ids outside the scanned ones embed with their frozen rows, in training too (`frozen`).
        embedding_lr: train the embedding rows at this LR (:func:`pema_triton.set_embedding_lr`).

    Returns:
        The :class:`~pema_triton.PemaHandle`.

    Raises:
        PemaError: the optimizer exists already; the datasets hold no token ids or prompts; `output="restricted"`
            with a reference model (DPO, KTO, GRPO with beta > 0), whose full-vocabulary log-probs would be compared
            with the policy's over U ids; an online trainer in `frozen` mode without `embed_unscanned=True`.
    """
    _check_choices(trainer, output, embed_unscanned, fused_loss)
    if options.get("trainable_ids") is not None:  # rows to train are kept whether or not the data holds them
        keep = [*torch.as_tensor(keep, dtype=torch.long).reshape(-1).tolist(),
                *torch.as_tensor(options["trainable_ids"]).reshape(-1).tolist()]
    used = trainer_used_ids(trainer, keep=keep, columns=columns)
    handle = replace_embeddings(trainer.model, used, output=output, fused_loss=fused_loss, **options)
    if embed_unscanned:
        embed_unused_ids(handle)
    if embedding_lr is not None:
        set_embedding_lr(trainer, embedding_lr)
    if callback:
        from .hf import PemaCallback

        if not any(isinstance(c, PemaCallback) for c in trainer.callback_handler.callbacks):
            trainer.add_callback(PemaCallback())
    return handle


def trainer_used_ids(trainer, *, keep=(), columns=None) -> torch.Tensor:
    """The sorted ids `compact_trainer` keeps for `trainer`: those its datasets feed (see there), the tokenizer's
    special ids and `keep`. For a baseline that freezes the other rows, or a look before compacting."""
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor holds its tokenizer
    vocab_size = inner_model(trainer.model).get_input_embeddings().num_embeddings
    used = _scan(trainer, vocab_size, columns)
    kept = set(keep) | (set(special_token_ids(tokenizer)) if tokenizer is not None else set())
    return torch.unique(torch.cat([used, torch.tensor(sorted(kept), dtype=used.dtype)]))


def _check_choices(trainer, output: str, embed_unscanned: bool, fused_loss: bool) -> None:
    if getattr(trainer, "optimizer", None) is not None:
        raise PemaError("the trainer's optimizer exists already and holds the full matrices; call compact_trainer "
                        "after building the trainer and before trainer.train()")
    adapters = getattr(trainer.model, "peft_config", {})
    if "ref" in adapters:
        raise PemaError(
            f"{type(trainer).__name__} keeps its reference as the PEFT adapter 'ref' (training went on from an "
            f"existing adapter): switching to it would keep the trained embedding rows, so the reference would move "
            f"with the policy; pass an explicit ref_model, or start from the base model with peft_config"
        )
    if output == "restricted" and _has_reference(trainer):
        raise PemaError(
            f"output='restricted' under {type(trainer).__name__}: the policy's log-probs would be a softmax over the "
            f"U used ids and the reference's over all V, offsetting every reward by log(Z_V / Z_U); use "
            f"output='frozen' (the exact full-vocabulary objective)"
        )
    online = hasattr(trainer, "_tokenize_prompts")  # GRPO, RLOO: completions generated during training
    if online and output == "frozen" and not embed_unscanned:
        raise PemaError(
            f"{type(trainer).__name__} generates completions whose ids nobody scanned; choose what they get: "
            f"embed_unscanned=True (their frozen rows, no gradient: full fine-tuning with every unscanned row "
            f"frozen) or output='restricted' (generation confined to the scanned ids)"
        )
    if fused_loss and _logits_path_trl(trainer):
        raise PemaError(f"fused_loss=True under this TRL's {type(trainer).__name__}: it reads the model's logits for "
                        f"its metrics, and a fused training step computes none; leave fused_loss off")
    if output == "restricted" and _logits_path_trl(trainer):
        raise PemaError(
            f"output='restricted' under this TRL's {type(trainer).__name__}: it computes its metrics from the model's "
            f"logits, whose U columns its accuracy would compare with labels in original ids; use output='frozen', "
            f"or TRL >= 1.15 (loss_type='chunked_nll' on 1.7 - 1.14), whose fused forward pema adapts"
        )
    if embed_unscanned and output != "frozen":
        raise PemaError(f"embed_unscanned=True needs output='frozen' (full-vocabulary logits), got {output!r}")


def _logits_path_trl(trainer) -> bool:
    """A TRL trainer whose model kept its own forward (TRL <= 1.6, or loss_type='nll' on 1.7 - 1.14)."""
    model = inner_model(trainer.model)
    return (type(trainer).__module__.partition(".")[0] == "trl"
            and getattr(model.__dict__.get("forward"), "__func__", None) is None)


def _has_reference(trainer) -> bool:
    """A reference model of its own (DPO, KTO; GRPO with beta > 0), with full-vocabulary log-probs. Under PEFT the
    reference is the policy with its adapter disabled: compacted alike, no offset."""
    return getattr(trainer, "ref_model", None) is not None


def _datasets(trainer) -> list:
    found = [trainer.train_dataset]
    evals = getattr(trainer, "eval_dataset", None)
    found += list(evals.values()) if isinstance(evals, dict) else [evals]
    return [d for d in found if d is not None]


def _progress(trainer) -> bool | None:
    """The scan's progress bar as the Trainer shows its own: none with `disable_tqdm`, or outside the main process
    (None: scan_vocabulary's default, which honours `datasets`' setting too)."""
    args = getattr(trainer, "args", None)
    zero = getattr(trainer, "is_world_process_zero", lambda: True)()
    return False if getattr(args, "disable_tqdm", False) or not zero else None


def _scan(trainer, vocab_size: int, columns) -> torch.Tensor:
    scans = []
    for dataset in _datasets(trainer):
        names = getattr(dataset, "column_names", None) or []
        wanted = [c for c in (columns or ID_COLUMNS) if c in names]
        if wanted:
            scans.append(scan_vocabulary(dataset, vocab_size, columns=wanted, progress=_progress(trainer)))
        elif "prompt" in names and hasattr(trainer, "_tokenize_prompts"):
            scans.append(_scan_prompts(trainer, dataset, vocab_size))
    if not scans:
        raise PemaError(
            f"{type(trainer).__name__}'s datasets hold no token-id columns ({', '.join(ID_COLUMNS[:4])}, ...) and "
            f"no prompts an online trainer tokenizes; name the id columns with columns=, or scan the data yourself "
            f"and call replace_embeddings"
        )
    return torch.unique(torch.cat(scans))


def _scan_prompts(trainer, dataset, vocab_size: int, batch: int = 256) -> torch.Tensor:
    """The ids of an online trainer's prompts as it tokenizes them for generation (its chat template, tools)."""
    prompts = dataset["prompt"]
    ids = [torch.as_tensor(row, dtype=torch.long) for start in range(0, len(prompts), batch)
           for row in trainer._tokenize_prompts(list(prompts[start:start + batch]))[0]]
    return scan_vocabulary(ids, vocab_size)
