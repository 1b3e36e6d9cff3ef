"""A learning rate of their own for the embedding rows: `embedding_param_groups` in a plain loop and
`compact_trainer(embedding_lr=)` / `set_embedding_lr` under a Trainer give, on a compacted model, what the same
call gives on the plain model with the unused rows frozen; the rows' group keeps the Trainer's other settings."""

import copy

import pytest
import torch

from helpers import tiny_models, tiny_trl, training
from pema_triton import (
    PemaError,
    embedding_param_groups,
    embedding_parameters,
    replace_embeddings,
    restore_embeddings,
    set_embedding_lr,
)

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
from pema_triton.hf import compact_trainer  # noqa: E402  (after the skips: imports transformers)


def _adamw_steps(model, batches, **lrs):
    optimizer = torch.optim.AdamW(embedding_param_groups(model, **lrs))
    for step, batch in enumerate(batches):
        torch.manual_seed(step)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("name", ["gpt2", "llama-untied"])
def test_a_plain_loop_gives_the_rows_their_lr_as_on_the_plain_model(name):
    used, _ = tiny_models.used_ids_and_batch(tiny_models.build(name), num_used=40)
    gen = torch.Generator().manual_seed(7)
    batches = [{"input_ids": (ids := used[torch.randint(0, len(used), (2, 9), generator=gen)]), "labels": ids}
               for _ in range(3)]
    lrs = {"lr": 1e-3, "embedding_lr": 1e-5, "weight_decay": 0.0}
    baseline = tiny_models.build(name).train()
    training.freeze_rows_outside(baseline, used)
    base_groups = _adamw_steps(baseline, batches, **lrs).param_groups
    pema = tiny_models.build(name).train()
    handle = replace_embeddings(pema, used)
    groups = _adamw_steps(pema, batches, **lrs).param_groups
    assert [g["lr"] for g in groups] == [g["lr"] for g in base_groups] == [1e-3, 1e-5]
    assert groups[1]["params"] == [m.weight for m in handle.embeddings[:1] + handle.heads[: 0 if handle.tied else 1]]
    restore_embeddings(pema)
    for key, tensor in baseline.state_dict().items():
        assert torch.equal(pema.state_dict()[key], tensor), key  # bit for bit: frozen mode, 40 used rows, CPU


def _sft(model, folder, **overrides):
    args = tiny_trl.config("sft", folder, optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="linear",
                           max_steps=3, **overrides)
    return trl.SFTTrainer(model=model, args=args, train_dataset=tiny_trl.sft_data(),
                          processing_class=tiny_trl.tokenizer())


def test_compact_trainer_embedding_lr_equals_the_plain_trainer_with_the_rows_frozen(tmp_path):
    model = tiny_trl.model()
    baseline = copy.deepcopy(model)
    trainer = _sft(model, tmp_path / "pema")
    handle = compact_trainer(trainer, embedding_lr=1e-4)
    trainer.create_optimizer()
    rows = {id(handle.embeddings[0].weight), id(handle.heads[0].weight)}
    mine = [g for g in trainer.optimizer.param_groups if any(id(p) in rows for p in g["params"])]
    assert [g["lr"] for g in mine] == [1e-4] and mine[0]["weight_decay"] == 0.1  # the Trainer's decay group
    assert {id(p) for p in mine[0]["params"]} == rows
    assert all(g["lr"] == 1e-2 for g in trainer.optimizer.param_groups if g is not mine[0])
    trainer.optimizer = None  # built again by train(), through the same wrapper
    trainer.train()
    reference = _sft(baseline, tmp_path / "baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    set_embedding_lr(reference, 1e-4)
    reference.train()
    tiny_trl.assert_same_run(trainer, reference, ("loss", "learning_rate"), model, baseline)


def test_misuse_is_refused(tmp_path):
    model = tiny_models.build("gpt2")
    model.requires_grad_(False)
    with pytest.raises(PemaError, match="no trainable input or output embedding"):
        embedding_parameters(model)
    trainer = _sft(tiny_trl.model(), tmp_path)
    trainer.create_optimizer()
    with pytest.raises(PemaError, match="before trainer.train"):
        set_embedding_lr(trainer, 1e-4)
