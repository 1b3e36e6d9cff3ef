"""State dicts, wrappers and files: a reused state_dict destination, DDP and SentenceTransformer(PeftModel)
wrappers, a hand-edited or corrupt `pema_compaction.json`, a save_trimmed target that is the working directory, a
PEFT or sentence-transformers model given to save_trimmed. Each ends in the right result or a typed error that
names the file or says what to pass, with nothing written or removed."""

import json

import pytest
import torch

from helpers import real_assets, tiny_models
from helpers.state import assert_state, snapshot
from pema_triton import (
    Compaction,
    SaveDirectoryError,
    UnsupportedModuleError,
    UsedIdsError,
    VocabularySizeError,
    replace_embeddings,
    restore_embeddings,
    save_trimmed,
)


@pytest.mark.parametrize("text, error, match", [
    ("{not json", UsedIdsError, "is not a pema_compaction.json .*JSONDecodeError"),
    ('{"vocab_size": 10}', UsedIdsError, "KeyError: 'used_ids'"),
    ('[1, 2]', UsedIdsError, "TypeError"),
    ('{"vocab_size": "10", "used_ids": [1, 2]}', VocabularySizeError, "vocab_size must be a positive int, got '10'"),
    ('{"vocab_size": 1.5, "used_ids": [1]}', VocabularySizeError, "got 1.5"),
    ('{"vocab_size": 10, "used_ids": [4, 2]}', UsedIdsError, "sorted ascending"),
    ('{"vocab_size": 10, "used_ids": ["a"]}', UsedIdsError, "integer token ids"),
    ('{"vocab_size": 10, "used_ids": [3, 12]}', UsedIdsError, r"\[12\] are outside the vocabulary"),
])
def test_a_corrupt_or_hand_edited_compaction_file_is_a_typed_error_naming_it(tmp_path, text, error, match):
    (tmp_path / "pema_compaction.json").write_text(text)
    with pytest.raises(error, match=match) as raised:
        Compaction.load(tmp_path)
    assert str(tmp_path / "pema_compaction.json") in str(raised.value)


def test_a_good_compaction_file_round_trips(tmp_path):
    saved = Compaction.of([2, 5, 7], 10)
    saved.save(tmp_path)
    loaded = Compaction.load(tmp_path)
    assert loaded.vocab_size == 10 and loaded.used_ids.tolist() == [2, 5, 7]
    assert json.loads((tmp_path / "pema_compaction.json").read_text()) == {"vocab_size": 10, "used_ids": [2, 5, 7]}


@pytest.mark.parametrize("where", [".", "..", ""])
def test_save_trimmed_never_replaces_the_working_directory(tmp_path, monkeypatch, where):
    work = tmp_path / "project"
    work.mkdir()
    (work / "train.py").write_text("print('my code')")
    monkeypatch.chdir(work)
    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    with pytest.raises(SaveDirectoryError, match="is the working directory or one of its parents"):
        save_trimmed(model, None, where, used_ids=used, overwrite=True)
    assert (work / "train.py").read_text() == "print('my code')"
    assert sorted(p.name for p in work.iterdir()) == ["train.py"]


def test_save_trimmed_of_a_peft_model_says_to_merge_first(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_models.build("llama-untied"), peft.LoraConfig(target_modules=["q_proj"]))
    used, _ = tiny_models.used_ids_and_batch(model)
    with pytest.raises(UnsupportedModuleError, match="merge_and_unload"):
        save_trimmed(model, None, tmp_path / "out", used_ids=used)
    assert not (tmp_path / "out").exists()


def test_save_trimmed_of_a_sentence_transformer_names_the_model_to_trim(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(real_assets.minilm_dir()), device="cpu")
    with pytest.raises(UnsupportedModuleError, match=r"model\[0\]\.auto_model"):
        save_trimmed(model, model.tokenizer, tmp_path / "out", used_ids=torch.tensor([0, 100, 101, 102]))
    assert not (tmp_path / "out").exists()


def test_a_reused_state_dict_destination_gets_the_rows_as_they_are_now():
    """`model.state_dict(destination=d)` with one dict reused across steps returned the first call's rows."""
    from pema_triton import replace_embeddings

    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    destination = {}
    model.state_dict(destination=destination)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)  # a step
    after = model.state_dict(destination=destination)["model.embed_tokens.weight"]
    assert torch.equal(after[used], model.get_input_embeddings().weight)


def test_restore_and_get_handle_see_through_a_ddp_wrapper():
    """`restore_embeddings(ddp_model)` said the model was not compacted."""
    import torch.distributed as dist

    from pema_triton import get_handle, replace_embeddings, restore_embeddings

    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        replace_embeddings(model, used)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert get_handle(wrapped) is get_handle(model)
        restore_embeddings(wrapped)
        assert get_handle(model) is None and model.get_input_embeddings().weight.shape[0] == tiny_models.V
    finally:
        dist.destroy_process_group()


def test_a_sentence_transformer_around_a_peft_model_trains_its_compact_rows():
    """PEFT froze every base weight; the compact rows were made trainable again only for a PeftModel given
    directly, so inside a SentenceTransformer they stayed frozen, silently."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    peft = pytest.importorskip("peft")
    from pema_triton import get_handle, replace_embeddings

    model = sentence_transformers.SentenceTransformer(str(real_assets.minilm_dir()), device="cpu")
    # As a PEFT adapter checkpoint loads: the Transformer module's model is a PeftModel (auto_model returns it).
    model[0].model = peft.get_peft_model(model[0].model, peft.LoraConfig(target_modules=["query", "value"]))
    assert not model[0].auto_model.get_input_embeddings().weight.requires_grad  # PEFT froze it
    replace_embeddings(model, torch.arange(0, 2000))
    assert get_handle(model).embeddings[0].weight.requires_grad


def test_restoring_a_model_moved_to_meta_is_refused_before_any_change():
    """`model.to("meta")` then restore crashed part-way: the trained rows hold no values there to merge."""
    from pema_triton import PemaError, get_handle, replace_embeddings, restore_embeddings

    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    handle = replace_embeddings(model, used)
    model.to("meta")
    with pytest.raises(PemaError, match="compact rows are on the meta device"):
        restore_embeddings(model)
    assert get_handle(model) is handle and len(handle.embeddings) == 1  # still compacted, every step undone later
    assert model.get_input_embeddings().weight.shape == (len(used), 32)


def test_a_model_planned_on_meta_still_restores():
    from pema_triton import get_handle, replace_embeddings, restore_embeddings

    model = tiny_models.build("llama-untied").to("meta")
    used, _ = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    restore_embeddings(model)
    assert get_handle(model) is None and model.get_input_embeddings().weight.shape == (tiny_models.V, 32)


@pytest.mark.parametrize("name, output", [("llama-untied", "frozen"), ("gpt2", "restricted")])
def test_a_dtype_round_trip_gives_what_the_uncompacted_model_would_hold(name, output):
    """fp32 -> bf16 -> fp32 rounds a plain model's unused rows too; the kept full matrices are cast with the compact
    rows, so the checkpoint while compacted and the restored model equal the plain model after the same calls (the
    unused rows used to come back with low bits the plain model had lost)."""
    plain = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(plain)
    model = tiny_models.build(name)
    replace_embeddings(model, used, output=output)
    for m in (plain, model):
        m.to(torch.bfloat16).float()
    assert_state(model, snapshot(plain))
    restore_embeddings(model)
    assert_state(model, snapshot(plain))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_restricted_trainer_checkpoint_states_the_full_vocabulary(tmp_path):
    """`config.vocab_size` is U while compacted in `restricted` mode (models shape their loss with it); whatever
    saves the model writes V: here the Trainer's checkpoint, whose config a later from_pretrained reads."""
    pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    model = tiny_models.build("llama-untied").train()
    used, _ = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output="restricted")
    args = tiny_models.trainer_args(tmp_path, max_steps=1, save_steps=1)
    transformers.Trainer(model=model, args=args, train_dataset=tiny_models.token_dataset(used, 4)).train()
    assert json.loads((tmp_path / "checkpoint-1" / "config.json").read_text())["vocab_size"] == tiny_models.V
    assert model.config.vocab_size == len(used)
