"""`replace_embeddings(model, used_ids, trainable_ids=T)`: only T's rows train, the other used ids are looked up
frozen, memory follows T, and training equals full fine-tuning with every row outside T frozen (to round-off);
ids outside the used set are still refused; bad options leave the model as it was."""

import pytest
import torch

from helpers import tiny_models
from helpers.devices import DEVICE
from helpers.training import assert_same_training, freeze_rows_outside, train
from pema_triton import get_handle, replace_embeddings, restore_embeddings
from pema_triton.errors import PemaError, UnusedIdError, UsedIdsError

pytest.importorskip("transformers")

EMBEDDING_KEY = {"gpt2": "transformer.wte.weight", "llama-untied": "model.embed_tokens.weight"}


def _case(name):
    used, _ = tiny_models.used_ids_and_batch(tiny_models.build(name), num_used=40)
    trainable = used[::4]  # 10 of the 40: "the new tokens"
    gen = torch.Generator().manual_seed(7)
    batches = [{"input_ids": (ids := used[torch.randint(0, len(used), (2, 9), generator=gen)]), "labels": ids}
               for _ in range(3)]
    return used, trainable, batches


@pytest.mark.parametrize("name, fused", [("gpt2", False), ("llama-untied", False), ("gpt2", True)],
                         ids=["tied", "untied", "tied-fused-loss"])
def test_training_equals_full_fine_tuning_with_the_other_rows_frozen(name, fused):
    used, trainable, batches = _case(name)
    baseline = tiny_models.build(name).train().to(DEVICE)
    pretrained = baseline.get_input_embeddings().weight.detach().clone()
    freeze_rows_outside(baseline, trainable)
    base_losses = train(baseline, batches, lambda model, batch: model(**batch).loss)

    pema = tiny_models.build(name).train().to(DEVICE)
    handle = replace_embeddings(pema, used, trainable_ids=trainable, fused_loss=fused)
    assert torch.equal(handle.used_ids, used) and torch.equal(handle.trainable_ids, trainable)
    t = len(trainable)
    assert handle.num_used == len(used) and handle.summary()["num_trainable"] == t
    assert f"{t} of them trainable" in repr(handle)
    compact = [p for p in pema.parameters() if p.requires_grad and p.shape[0] == t]
    assert compact and all(p.shape[0] != tiny_models.V for p in pema.parameters() if p.requires_grad)
    pema_losses = train(pema, batches, lambda model, batch: model(**batch).loss)
    restore_embeddings(pema)

    # To round-off, not bit for bit: the head's weight gradient is a GEMM over the T = 10 trainable rows, and a
    # 10-row GEMM sums in another order than the baseline's 97-row one (5.4e-7 apart on one [16, 97] product;
    # with 40 rows, as in test_training, the blocking is the same and frozen mode is bit for bit).
    assert_same_training(pema_losses, base_losses, pema.state_dict(), baseline.state_dict(), exact=False,
                         embedding_key=None if fused else EMBEDDING_KEY[name], far_fraction=2e-4)
    weight = pema.get_input_embeddings().weight.detach()
    frozen = torch.ones(tiny_models.V, dtype=torch.bool)
    frozen[trainable] = False
    assert torch.equal(weight[frozen], pretrained[frozen])  # the used-but-frozen rows too, bit for bit
    assert not torch.equal(weight[trainable], pretrained[trainable])


def test_memory_follows_the_trainable_count():
    used, trainable, _ = _case("gpt2")
    everything = replace_embeddings(tiny_models.build("gpt2"), used)
    some = replace_embeddings(tiny_models.build("gpt2"), used, trainable_ids=trainable)
    d = tiny_models.build("gpt2").get_input_embeddings().embedding_dim
    assert everything.params_after - some.params_after == (len(used) - len(trainable)) * d
    fewer = (len(used) - len(trainable)) * d * 16  # fp32 weight, gradient and two Adam moments per element
    assert everything.state_bytes_after - some.state_bytes_after == fewer


def test_ids_outside_the_used_set_are_still_refused_and_generation_may_pick_any():
    used, trainable, _ = _case("gpt2")
    model = tiny_models.build("gpt2").eval()
    replace_embeddings(model, used, trainable_ids=trainable)
    outside = int(next(i for i in range(tiny_models.V) if i not in set(used.tolist())))
    with pytest.raises(UnusedIdError, match=str(outside)):
        model(input_ids=torch.tensor([[int(used[1]), outside]]))
    model(input_ids=used[None, :5])  # trainable and frozen used ids together
    out = model.generate(used[None, :3], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)  # full-vocabulary logits may emit an id nobody scanned: embedded with its frozen row


@pytest.mark.parametrize("kwargs, error, words", [
    ({"trainable_ids": [0, 1, 2]}, UsedIdsError, "not in used_ids"),
    ({"trainable_ids": [5, 3]}, UsedIdsError, "sorted"),
    ({"trainable_ids": "first", "output": "restricted"}, PemaError, "trainable_ids needs output='frozen'"),
])
def test_bad_trainable_ids_are_refused_and_the_model_is_untouched(kwargs, error, words):
    used, trainable, _ = _case("gpt2")
    model = tiny_models.build("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(kwargs, trainable_ids=trainable) if kwargs["trainable_ids"] == "first" else kwargs
    if kwargs["trainable_ids"] == [0, 1, 2]:
        kwargs["trainable_ids"] = [i for i in range(tiny_models.V) if i not in set(used.tolist())][:3]
    with pytest.raises(error, match=words):
        replace_embeddings(model, used, **kwargs)
    assert get_handle(model) is None and type(model.get_input_embeddings()).__name__ == "Embedding"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_checkpoints_hold_the_full_matrices_and_resume_with_both_id_sets(tmp_path):
    """save_pretrained / state_dict write the full [V, D] matrices (trained rows merged), pema_compaction.json
    records the used and the trainable ids, and a model compacted again from them loads the checkpoint."""
    from pema_triton import Compaction

    used, trainable, batches = _case("llama-untied")
    model = tiny_models.build("llama-untied").train()
    replace_embeddings(model, used, trainable_ids=trainable)
    train(model, batches, lambda m, batch: m(**batch).loss)
    model.save_pretrained(tmp_path)
    saved = model.state_dict()
    assert saved["model.embed_tokens.weight"].shape[0] == tiny_models.V
    restore_embeddings(model)
    assert torch.equal(saved["model.embed_tokens.weight"], model.get_input_embeddings().weight)
    assert torch.equal(Compaction.load(tmp_path).used_ids, used)
    assert torch.equal(Compaction.load(tmp_path, "trainable_ids").used_ids, trainable)
    resumed = tiny_models.build("llama-untied", seed=1)
    handle = replace_embeddings(resumed, Compaction.load(tmp_path),
                                trainable_ids=Compaction.load(tmp_path, "trainable_ids"))
    resumed.load_state_dict(saved)
    restore_embeddings(resumed)
    for key, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], tensor), key
    assert handle.summary()["num_trainable"] == len(trainable)


def test_the_frozen_rows_follow_casts_and_copies():
    """The used-but-frozen rows are read where the model keeps them at each forward: after a bf16 round trip they
    are the rounded rows (as the uncompacted model's), and a deep copy embeds with its own rows."""
    import copy

    used, trainable, _ = _case("llama-untied")
    plain = tiny_models.build("llama-untied").eval()
    model = copy.deepcopy(plain)
    replace_embeddings(model, used, trainable_ids=trainable)
    ids = used[None, :12]
    plain.to(torch.bfloat16).to(torch.float32)
    model.to(torch.bfloat16).to(torch.float32)
    torch.testing.assert_close(model.get_input_embeddings()(ids), plain.get_input_embeddings()(ids), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        get_handle(twin).kept_input.param.add_(1.0)  # only the copy's frozen rows move
    frozen = ids[~torch.isin(ids, trainable)]
    assert torch.equal(twin.get_input_embeddings()(frozen), model.get_input_embeddings()(frozen) + 1.0)


def test_compact_trainer_keeps_trainable_ids_the_data_lacks(tmp_path):
    trl = pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from helpers import tiny_trl
    from pema_triton.hf import compact_trainer

    trainer = trl.SFTTrainer(model=tiny_trl.model(), args=tiny_trl.config("sft", tmp_path),
                             train_dataset=tiny_trl.sft_data(high=60), processing_class=tiny_trl.tokenizer())
    handle = compact_trainer(trainer, trainable_ids=[90, 91], callback=False)  # new tokens, not in the data
    assert handle.trainable_ids.tolist() == [90, 91] and {90, 91} <= set(handle.used_ids.tolist())
    handle.restore()
