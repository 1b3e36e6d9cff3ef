"""PEMA under sentence-transformers: the real all-MiniLM-L6-v2 `SentenceTransformer`, fine-tuned by its own
`SentenceTransformerTrainer` with MultipleNegativesRankingLoss on real BBC News (title, first sentence) pairs.

`replace_embeddings` takes the SentenceTransformer itself and compacts the BERT model inside it
(`model[0].auto_model`, :mod:`pema_triton.wrappers`); `PemaCallback` restores it when training ends. BERT's input
embedding is untied, so PEMA is exactly full fine-tuning: with weight decay 0 the run with PEMA and the run
without it, from the same weights and seed, end bit-identical (losses, every weight, the checkpoint saved
mid-training). Both runs stay on the CPU, where the two embedding backwards sum each row in the same order
(GPU atomics would reorder the sums; tests/test_real_models.py covers the GPU tolerance).
"""

import pytest
import torch

from helpers import real_assets
from pema_triton import (
    AlreadyCompactedError,
    get_handle,
    replace_embeddings,
    restore_embeddings,
    scan_vocabulary,
    special_token_ids,
)

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
from datasets import Dataset  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402

from pema_triton.hf import PemaCallback  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

# 24 pairs in batches of 8: 3 steps, one epoch; 32 tokens keep a step well under a second on 2 CPU cores.
PAIRS, BATCH, STEPS, SAVE_AT, MAX_SEQ_LENGTH = 24, 8, 3, 2, 32


def _pairs(num: int) -> Dataset:
    """(anchor: an article's title, positive: its first sentence) for `num` real BBC News articles."""
    texts, _ = real_assets.bbc_news(num)
    anchors, positives = [], []
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        anchors.append(lines[0])
        positives.append(lines[1].split(". ")[0])
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


def _load():
    model = st.SentenceTransformer(str(real_assets.minilm_dir()), device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    return model


def _input_matrix(model) -> torch.Tensor:
    """[V, D] word-embedding matrix of the BERT model inside (its state-dict name changes across versions)."""
    return model[0].auto_model.get_input_embeddings().weight.detach()


def _used_ids(model, train: Dataset) -> torch.Tensor:
    """Every id the trainer can feed: both columns, untruncated (a superset of the truncated batches)."""
    tokenizer = model.tokenizer
    batches = [tokenizer(list(train[column])) for column in train.column_names]
    return scan_vocabulary(batches, len(tokenizer), keep=special_token_ids(tokenizer))


def _train(model, train: Dataset, output_dir) -> tuple[list[float], PemaCallback]:
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-4,
        weight_decay=0.0,  # decay would shrink every row, used or not, in full fine-tuning only
        seed=0, save_strategy="steps", save_steps=SAVE_AT, save_only_model=True, logging_steps=1,
        report_to=[], dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )
    callback = PemaCallback()
    trainer = st.SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model), callbacks=[callback]
    )
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], callback


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same fine-tuning without and with PEMA: (plain, pema) dicts of model, losses, checkpoint folder."""
    train = _pairs(PAIRS)
    out = {}
    for name in ("plain", "pema"):
        model = _load()
        pretrained = _input_matrix(model).clone()
        handle = replace_embeddings(model, _used_ids(model, train)) if name == "pema" else None
        folder = tmp_path_factory.mktemp(name)
        losses, callback = _train(model, train, folder)
        out[name] = dict(model=model, losses=losses, callback=callback, handle=handle, pretrained=pretrained,
                         checkpoint=folder / f"checkpoint-{SAVE_AT}")
    return out["plain"], out["pema"]


def test_trainer_with_pema_is_exactly_full_fine_tuning(runs):
    plain, pema = runs
    assert len(pema["losses"]) == STEPS
    assert pema["losses"] == plain["losses"]
    assert get_handle(pema["model"]) is None  # PemaCallback restored it when training ended
    # What the callback measured at the end of training: the optimizer held moments for the U used rows only.
    assert pema["callback"].training_state["optimizer"] < plain["callback"].training_state["optimizer"]
    plain_state, pema_state = plain["model"].state_dict(), pema["model"].state_dict()
    assert pema_state.keys() == plain_state.keys()
    for key, weight in plain_state.items():
        assert torch.equal(pema_state[key], weight), key

    trained, pretrained, used = _input_matrix(pema["model"]), pema["pretrained"], pema["handle"].used_ids
    unused = torch.ones(trained.shape[0], dtype=torch.bool)
    unused[used] = False
    assert torch.equal(trained[unused], pretrained[unused])
    assert not torch.equal(trained[used], pretrained[used])  # the used rows did train


def test_restored_model_saves_and_reloads_as_a_plain_sentence_transformer(runs, tmp_path):
    plain, pema = runs
    pema["model"].save(str(tmp_path))
    assert not (tmp_path / "pema_compaction.json").exists()  # restored: nothing of PEMA is left in the folder
    reloaded = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert _input_matrix(reloaded).shape == (30_522, 384)
    sentences = list(_pairs(4)["anchor"]) + ["Words outside the training pairs: zebra, quantum, marmalade."]
    expected = pema["model"].encode(sentences, convert_to_tensor=True)
    assert torch.equal(reloaded.encode(sentences, convert_to_tensor=True), expected)
    assert torch.equal(plain["model"].encode(sentences, convert_to_tensor=True), expected)


def test_checkpoint_saved_mid_training_is_full_vocabulary(runs):
    plain, pema = runs
    # Saved while compacted: the full [V, D] matrix under its original name, plus the used ids to resume with.
    assert (pema["checkpoint"] / "pema_compaction.json").exists()
    at_checkpoint = st.SentenceTransformer(str(pema["checkpoint"]), device="cpu")
    reference = st.SentenceTransformer(str(plain["checkpoint"]), device="cpu")
    assert _input_matrix(at_checkpoint).shape == (30_522, 384)
    state, expected = at_checkpoint.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, weight in expected.items():
        assert torch.equal(state[key], weight), key


def test_the_sentence_transformer_is_the_handle_holder():
    model = _load()
    used = _used_ids(model, _pairs(4))
    handle = replace_embeddings(model, used)
    inner = model[0].auto_model
    assert get_handle(model) is handle and get_handle(inner) is handle and handle.model is inner
    assert handle.vocab_size == 30_522 and handle.num_used == len(used)
    with pytest.raises(AlreadyCompactedError):
        replace_embeddings(model, used)
    with pytest.raises(AlreadyCompactedError):
        replace_embeddings(inner, used)
    assert restore_embeddings(model) is model
    assert get_handle(model) is None
