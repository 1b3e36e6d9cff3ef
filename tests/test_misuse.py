"""Misuse catalogue: what a demanding user does that the happy path does not, each the shortest reproducer.

Every case ends with either the correct result or a typed PemaError that says what to do, and the model (and any
checkpoint) intact: the trained rows can always be merged back. A new case gets a test here.
"""

import copy

import pytest
import torch

from helpers import tiny_models
from helpers.state import assert_state as _assert_state
from helpers.state import snapshot as _snapshot
from pema_triton import (
    PemaDTypeError,
    PemaError,
    UnusedIdError,
    get_handle,
    replace_embeddings,
    restore_embeddings,
    scan_vocabulary,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# -- copies ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_a_deep_copy_is_an_independent_compacted_model(output):
    """EMA (`AveragedModel`) deep-copies the model: the copy's checkpoints, loads and restore are its own."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output=output)
    before = _snapshot(model)
    copy_ = copy.deepcopy(model)
    assert get_handle(copy_) is not get_handle(model) and get_handle(copy_).model is copy_

    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(0.25)
    trained_copy = _snapshot(copy_)
    assert not torch.equal(trained_copy["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    _assert_state(model, before)  # the original's checkpoint is not the copy's
    model.load_state_dict(trained_copy)  # loading into the original leaves the copy alone
    _assert_state(copy_, trained_copy)
    model.load_state_dict(before)
    assert copy_.generate.__wrapped__.__self__ is copy_  # the copy's patched methods run the copy

    restore_embeddings(copy_)
    restore_embeddings(model)
    _assert_state(copy_, trained_copy)
    _assert_state(model, before)


def test_an_averaged_model_saves_its_own_average():
    model = tiny_models.build("gpt2")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    ema.update_parameters(model)  # the first update copies
    start = model.transformer.wte.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    ema.update_parameters(model)  # 0.5 * start + 0.5 * now

    key = "transformer.wte.weight"
    live, averaged = model.state_dict()[key], ema.module.state_dict()[key]
    expected_rows = 0.5 * start + 0.5 * model.transformer.wte.weight.detach()
    torch.testing.assert_close(averaged[used], expected_rows)
    assert not torch.equal(averaged[used], live[used])
    unused = torch.ones(tiny_models.V, dtype=torch.bool)
    unused[used] = False
    assert torch.equal(averaged[unused], live[unused])  # never trained in either


# -- arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offload", ["gpu", "meta", 3.5] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_bad_offload_is_refused_before_the_model_changes(offload):
    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    before = _snapshot(model)
    with pytest.raises(PemaError, match=rf"offload={offload!r}"):
        replace_embeddings(model, used, offload=offload)
    assert get_handle(model) is None and type(model.transformer.wte) is torch.nn.Embedding
    _assert_state(model, before)
    replace_embeddings(model, used)  # and it can be compacted afterwards
    restore_embeddings(model)
    _assert_state(model, before)


# -- dtype -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_checkpoints_are_in_the_dtype_the_model_has_now(output, tmp_path):
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    plain = copy.deepcopy(model).to(torch.bfloat16)
    replace_embeddings(model, used, output=output)
    model.to(torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    _assert_state(model, plain.state_dict())  # what the uncompacted model saves after the same .to()
    model.save_pretrained(tmp_path / "pema")
    plain.save_pretrained(tmp_path / "plain")
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("pema", "plain")}
    assert size["pema"] == size["plain"]


# -- masked-LM collators -----------------------------------------------------------------------------------------
def test_masked_lm_fine_tuning_with_random_replacements_from_the_used_ids(tmp_path):
    """DataCollatorForLanguageModeling draws random tokens from the whole vocabulary; UsedVocabularyCollator
    re-draws those outside the used ids, uniformly over them. Real MiniLM tokenizer, real BBC News text."""
    datasets = pytest.importorskip("datasets")
    from helpers import real_assets
    from pema_triton import special_token_ids
    from pema_triton.hf import UsedVocabularyCollator

    tokenizer = transformers.AutoTokenizer.from_pretrained(real_assets.minilm_dir())
    texts, _ = real_assets.bbc_news(16)
    data = datasets.Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=48)))
    used = scan_vocabulary(data, len(tokenizer), keep=special_token_ids(tokenizer))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    replace_embeddings(model, used)
    mlm = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5, random_replace_prob=0.5,
                                                       mask_replace_prob=0.0)
    rows = [data[i] for i in range(8)]
    with pytest.raises(UnusedIdError):  # what a user meets without the wrapper
        model(**mlm(rows))

    collator = UsedVocabularyCollator(mlm, used)
    batch = collator(rows)
    assert set(batch["input_ids"].flatten().tolist()) <= set(used.tolist())
    args = tiny_models.trainer_args(tmp_path, max_steps=3, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0
    restore_embeddings(model)


def test_random_replacements_are_uniform_over_the_used_ids():
    from pema_triton.hf import UsedVocabularyCollator

    used = torch.tensor([3, 10, 11, 40])

    def collator(examples):  # every position predicted, every input a random id of a V=50 vocabulary
        ids = torch.randint(50, (200, 50), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "labels": ids.clone()}

    ids = UsedVocabularyCollator(collator, used)(None)["input_ids"]
    counts = torch.bincount(ids.flatten(), minlength=50)
    assert counts[used].sum() == ids.numel()
    assert counts[used].min() > 0.9 * ids.numel() / 4  # 2,500 each in expectation


# -- scan inputs -------------------------------------------------------------------------------------------------
def test_scan_inputs_that_used_to_fail_obscurely_or_silently():
    np = pytest.importorskip("numpy")
    datasets = pytest.importorskip("datasets")
    streamed = [{"input_ids": [5, 6]}, {"input_ids": []}, {"input_ids": [7]}]  # an empty row while streaming
    assert scan_vocabulary(streamed, 10).tolist() == [5, 6, 7]
    assert scan_vocabulary(np.array([[1, 2], [2, 9]]), 10).tolist() == [1, 2, 9]
    assert scan_vocabulary([np.array([1, 2]), np.array([3])], 10).tolist() == [1, 2, 3]
    assert scan_vocabulary([np.int64(4), np.int64(1)], 10).tolist() == [1, 4]
    with pytest.raises(PemaError, match="cannot scan text"):
        scan_vocabulary(["an untokenized sentence", "another"], 10)
    with pytest.raises(PemaError, match="tokenize"):
        scan_vocabulary([{"input_ids": ["a", "b"]}], 10)
    with pytest.raises(PemaError, match=r"no batch or split has the column\(s\) \['label_ids'\]"):
        scan_vocabulary([{"input_ids": [1], "labels": [2]}], 10, columns=("input_ids", "label_ids"))
    floats = datasets.Dataset.from_dict({"input_ids": [[1.0, 2.5]]})
    with pytest.raises(PemaDTypeError, match="'input_ids' holds double"):
        scan_vocabulary(floats, 10)
    with pytest.raises(PemaDTypeError, match="int32 or int64"):
        scan_vocabulary([{"input_ids": [[1.0], [2.5]]}], 10)  # ragged float rows are not truncated


# -- silent misuse -----------------------------------------------------------------------------------------------
def test_an_optimizer_built_before_replace_refuses_to_step():
    model = tiny_models.build("gpt2")
    used, ids = tiny_models.used_ids_and_batch(model)
    before = _snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # holds the full [V, D] matrix
    replace_embeddings(model, used)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(PemaError, match="build the optimizer after replace_embeddings"):
        optimizer.step()
    _assert_state(model, before)  # refused before any weight moved
    restore_embeddings(model)
    optimizer.step()  # the restored matrix trains again under the old optimizer
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before["transformer.h.0.mlp.c_fc.weight"])


def test_a_second_train_after_the_callback_restored_the_model_is_refused(tmp_path):
    pytest.importorskip("datasets")
    from pema_triton.hf import PemaCallback

    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    data = tiny_models.token_dataset(used, 8)
    replace_embeddings(model, used)
    args = tiny_models.trainer_args(tmp_path, max_steps=2, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[PemaCallback()])
    trainer.train()
    assert get_handle(model) is None  # restored at the end, as documented
    restored = _snapshot(model)
    with pytest.raises(PemaError, match="restored the model when the previous train"):
        trainer.train()  # would silently train the full, uncompacted model
    _assert_state(model, restored)
    replace_embeddings(model, used)  # compacted again, the old Trainer's optimizer holds the retired rows
    with pytest.raises(PemaError, match="restore_embeddings has merged back"):
        trainer.train()
    restore_embeddings(model)
    _assert_state(model, restored)


def test_load_state_dict_with_assign_is_refused_and_keeps_the_tie():
    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    before = _snapshot(model)
    replace_embeddings(model, used)
    with pytest.raises(PemaError, match=r"assign=True"):
        model.load_state_dict(model.state_dict(), assign=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    restore_embeddings(model)
    _assert_state(model, before)


class _ReadsItsEmbeddingMatrix(torch.nn.Module):
    """Ties by hand: logits from `embed.weight` read in forward, not through a head module."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(tiny_models.V, 32)
        self.mix = torch.nn.Linear(32, 32)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        return self.mix(self.embed(input_ids)) @ self.embed.weight.t()


def test_logits_read_from_the_compacted_matrix_directly_are_an_error():
    model = _ReadsItsEmbeddingMatrix()
    used = torch.arange(0, 80, 2)  # U = 40: neither V (97) nor D (32)
    ids = used[:6].reshape(2, 3)
    assert model(ids).shape[-1] == tiny_models.V
    replace_embeddings(model, used)
    with pytest.raises(PemaError, match="reads the compacted matrix"):
        model(ids)
    restore_embeddings(model)
    assert model(ids).shape[-1] == tiny_models.V


# -- restricted logits and code outside the model's own loss -------------------------------------------------------
def test_restricted_remaps_labels_given_by_position():
    import inspect

    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output="restricted")
    names = list(inspect.signature(model.forward).parameters)
    args = [None] * (names.index("labels") + 1)
    args[names.index("input_ids")], args[-1] = ids, ids
    with torch.no_grad():
        by_keyword = model(input_ids=ids, labels=ids).loss
        by_position = model(*args).loss
    assert torch.equal(by_position, by_keyword)


def test_restricted_training_without_labels_warns_and_label_smoothing_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pema_triton import PemaWarning
    from pema_triton.hf import PemaCallback

    model = tiny_models.build("llama-untied").train()
    used, ids = tiny_models.used_ids_and_batch(model)
    handle = replace_embeddings(model, used, output="restricted")
    with pytest.warns(PemaWarning, match="handle.labels_to_columns"):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, len(used)),
                                             handle.labels_to_columns(ids[:, 1:]).reshape(-1))
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)  # the documented way agrees

    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = _snapshot(model)
    args = tiny_models.trainer_args(tmp_path, max_steps=2, save_strategy="no", label_smoothing_factor=0.1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[PemaCallback()])
    with pytest.raises(PemaError, match="label_smoothing_factor > 0 with output='restricted'"):
        trainer.train()
    _assert_state(model, before)


@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_metrics_see_original_id_predictions(output, tmp_path):
    """Token accuracy through the Trainer is the same in both modes for the same weights (it read 0.02 for
    restricted, whose argmax is a compact column, where frozen read 1.0)."""
    import functools

    datasets = pytest.importorskip("datasets")
    from pema_triton.hf import original_id_predictions

    model = tiny_models.build("gpt2")
    used, ids = tiny_models.used_ids_and_batch(model, shape=(4, 9))
    with torch.no_grad():
        targets = model(input_ids=ids).logits.argmax(-1)  # labels the untrained model predicts perfectly
    targets = torch.where(torch.isin(targets, used), targets, -100)  # restricted can only predict used ids
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": torch.roll(targets, 1, -1).tolist()})
    replace_embeddings(model, used, output=output)

    def accuracy(prediction):
        predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        keep = labels != -100
        return {"accuracy": float((predicted[keep] == labels[keep]).mean())}

    args = tiny_models.trainer_args(tmp_path, per_device_eval_batch_size=4)
    predictions = functools.partial(original_id_predictions, model=model)
    trainer = transformers.Trainer(model=model, args=args, eval_dataset=data, compute_metrics=accuracy,
                                   preprocess_logits_for_metrics=predictions)
    assert trainer.evaluate()["eval_accuracy"] == 1.0


# -- checkpoints across compactions ----------------------------------------------------------------------------
def _trainer(model, data, output_dir, max_steps, optim="adamw_torch_fused"):
    args = tiny_models.trainer_args(output_dir, max_steps=max_steps, save_steps=2, optim=optim)
    return transformers.Trainer(model=model, args=args, train_dataset=data)


def _checkpoint_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_resuming_a_checkpoint_under_another_compaction_is_refused(optim, tmp_path):
    """Adam moments of [U, D] compact rows must not be stepped on other rows: fused Adam corrupted the heap."""
    pytest.importorskip("datasets")
    from pema_triton import Compaction

    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    data = tiny_models.token_dataset(used, 8)
    replace_embeddings(model, used)
    _trainer(model, data, tmp_path / "run", 2, optim).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert Compaction.load(checkpoint).used_ids.tolist() == used.tolist()  # recorded beside the weights
    files = _checkpoint_files(checkpoint)

    plain = tiny_models.build("llama-untied")
    with pytest.raises(PemaError, match="saved for a compaction of .* but this parameter is the full, uncompacted"):
        _trainer(plain, data, tmp_path / "run", 4, optim).train(resume_from_checkpoint=str(checkpoint))

    other = tiny_models.build("llama-untied")  # a re-scanned dataset: the same U, other ids
    special = tiny_models.special_ids(other)
    pool = [i for i in range(tiny_models.V) if i not in set(used.tolist()) | special]
    other_used = torch.tensor(sorted(special | set(pool[: len(used) - len(special)])))
    assert len(other_used) == len(used) and not torch.equal(other_used, used)
    other_data = tiny_models.token_dataset(other_used, 8)
    replace_embeddings(other, other_used)
    with pytest.raises(PemaError, match="Compaction.load"):
        _trainer(other, other_data, tmp_path / "run", 4, optim).train(resume_from_checkpoint=str(checkpoint))
    assert _checkpoint_files(checkpoint) == files  # the checkpoint is intact

    same = tiny_models.build("llama-untied")
    replace_embeddings(same, Compaction.load(checkpoint))  # the documented way resumes
    _trainer(same, data, tmp_path / "run", 4, optim).train(resume_from_checkpoint=str(checkpoint))
    restore_embeddings(same)


def test_full_vocabulary_optimizer_state_is_refused_on_compact_rows(tmp_path):
    pytest.importorskip("datasets")
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    data = tiny_models.token_dataset(used, 8)
    _trainer(model, data, tmp_path / "run", 2).train()  # plain model: [V, D] moments
    compacted = tiny_models.build("llama-untied")
    replace_embeddings(compacted, used)
    with pytest.raises(PemaError, match="checkpoint of an uncompacted model"):
        trainer = _trainer(compacted, data, tmp_path / "run", 4)
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


# -- changing the vocabulary or the embedding modules while compacted -------------------------------------------
@pytest.mark.parametrize("name", ["llama-untied", "gpt2"])
def test_vocabulary_changes_are_refused_while_compacted_and_allowed_after_restore(name):
    """`resize_token_embeddings` used to resize the [U, D] matrix as if it were [V, D] (and set vocab_size from U),
    after which restore failed with an IndexError; swapping an embedding module left the trained rows in a module
    restore merges from but the model no longer holds."""
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)  # "trained" rows
    trained = _snapshot(model)

    calls = [("resize_token_embeddings", (tiny_models.V + 8,)),
             ("set_input_embeddings", (torch.nn.Embedding(tiny_models.V, 32),)),
             ("set_output_embeddings", (torch.nn.Linear(32, tiny_models.V, bias=False),))]
    for method, args in calls:
        with pytest.raises(PemaError, match=rf"{method}\(\) on a compacted model .* restore_embeddings\(model\) first"):
            getattr(model, method)(*args)
    _assert_state(model, trained)
    assert model.config.vocab_size == tiny_models.V
    logits = model(input_ids=ids).logits
    model.tie_weights()  # transformers calls it itself (loading, resizing): a compacted model keeps what it has
    assert torch.equal(model(input_ids=ids).logits, logits)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (name == "gpt2")

    restore_embeddings(model)
    _assert_state(model, trained)  # every trained row merged back
    model.resize_token_embeddings(tiny_models.V + 8)  # the model's own method again
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == tiny_models.V + 8


# -- pickling the whole model ------------------------------------------------------------------------------------
_LOAD_RESTORE_SAVE = """
import sys, torch
from pema_triton import get_handle, restore_embeddings
model = torch.load(sys.argv[1], weights_only=False)
assert get_handle(model) is not None
logits = model(**torch.load(sys.argv[2])).logits
restore_embeddings(model)
torch.save({"logits": logits, "state": model.state_dict()}, sys.argv[3])
"""


@pytest.mark.parametrize("name, output", [("gpt2", "frozen"), ("gemma-scaled-embedding", "restricted"),
                                          ("bart-logits-bias", "frozen")])
def test_torch_save_of_a_compacted_model_loads_and_restores(name, output, tmp_path):
    """`torch.save(model)` used to fail ("Can't pickle local object", "cannot pickle code objects")."""
    model, batch, files = _save_compacted(name, output, tmp_path)
    copy_ = torch.load(files[0], weights_only=False)
    logits = copy_(**batch).logits
    restore_embeddings(copy_)
    torch.save({"logits": logits, "state": copy_.state_dict()}, files[2])
    _assert_loaded_equals(model, batch, files[2])


@pytest.mark.slow
def test_a_saved_compacted_subclass_loads_in_a_fresh_process(tmp_path):
    """Gemma's and BART's embeddings are subclasses compacted in place, whose compact class exists in no module: a
    fresh process must make it again to load one."""
    import subprocess
    import sys

    model, batch, files = _save_compacted("bart-logits-bias", "frozen", tmp_path)
    result = subprocess.run([sys.executable, "-c", _LOAD_RESTORE_SAVE, *files], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_loaded_equals(model, batch, files[2])


def _save_compacted(name, output, tmp_path):
    """A compacted tiny model with "trained" rows and a batch, saved whole; returns them and [model, batch, out]
    file names."""
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output=output)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)  # "trained" rows
    batch = {"input_ids": ids} | ({"decoder_input_ids": ids} if name.startswith("bart") else {})
    torch.save(model, tmp_path / "model.pt")
    torch.save(batch, tmp_path / "batch.pt")
    return model, batch, [str(tmp_path / f) for f in ("model.pt", "batch.pt", "out.pt")]


def _assert_loaded_equals(model, batch, out_file):
    loaded = torch.load(out_file)
    assert torch.equal(loaded["logits"], model(**batch).logits)
    restore_embeddings(model)
    _assert_state(model, loaded["state"])  # the loaded copy merged the same trained rows back


# -- used ids in every form a user has them ---------------------------------------------------------------------
@pytest.mark.parametrize("form", ["tensor", "list", "tuple", "set", "range", "numpy", "generator", "dict keys"])
def test_used_ids_from_any_integer_iterable(form):
    import numpy as np

    from pema_triton import Compaction

    ids = [3, 5, 6, 9]
    given = {"tensor": torch.tensor(ids), "list": ids, "tuple": tuple(ids), "set": set(ids), "range": range(3, 10),
             "numpy": np.array(ids, dtype=np.int32), "generator": (i for i in ids),
             "dict keys": dict.fromkeys(ids).keys()}[form]
    expected = list(range(3, 10)) if form == "range" else ids
    assert Compaction.of(given, 12).used_ids.tolist() == expected


@pytest.mark.parametrize("bad", ["abc", [1.0, 2.0], "numpy floats", None, 3, [[1, 2]]])
def test_used_ids_that_are_not_integer_ids_are_a_used_ids_error(bad):
    import numpy as np

    from pema_triton import Compaction, UsedIdsError

    with pytest.raises(UsedIdsError, match="used_ids must be"):
        Compaction.of(np.array([1.5, 2.0]) if bad == "numpy floats" else bad, 12)
