"""Inputs users have that the scan and the compaction used to refuse with a raw error, or read wrongly: each a
shortest reproducer ending in the right result or a typed error that says what to do."""

import numpy as np
import pytest
import torch

from helpers import tiny_models
from helpers.state import assert_state, snapshot
from pema_triton import (
    PemaError,
    UsedIdsError,
    VocabularyScan,
    VocabularySizeError,
    get_handle,
    replace_embeddings,
    scan_vocabulary,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.int32, np.int64])
def test_numpy_token_files_of_any_integer_dtype_scan(dtype):
    """uint16 is how 50k-vocabulary token files are stored (nanoGPT's .bin); it was refused."""
    ids = np.array([[5, 9, 200], [9, 0, 250]], dtype=dtype)
    assert scan_vocabulary(ids, 256).tolist() == [0, 5, 9, 200, 250]
    assert VocabularyScan(256).update(torch.from_numpy(ids.astype(np.int16))).used_ids().tolist() == [0, 5, 9, 200,
                                                                                                      250]


def test_keep_none_is_no_extra_ids_and_bad_keep_is_a_used_ids_error():
    assert scan_vocabulary(torch.tensor([3, 1]), 10, keep=None).tolist() == [1, 3]
    with pytest.raises(UsedIdsError, match="keep must be integer token ids"):
        scan_vocabulary(torch.tensor([3, 1]), 10, keep=[0.5])
    with pytest.raises(UsedIdsError, match="keep must be token ids"):
        scan_vocabulary(torch.tensor([3, 1]), 10, keep=5)


@pytest.mark.parametrize("vocab_size", [1e6, "50257", 0, -3, True])
def test_a_vocab_size_that_is_no_positive_int_says_so(vocab_size):
    with pytest.raises(VocabularySizeError, match="vocab_size must be a positive int"):
        scan_vocabulary(torch.tensor([3, 1]), vocab_size)
    with pytest.raises(VocabularySizeError, match="vocab_size must be a positive int"):
        VocabularyScan(vocab_size)


def test_a_dataloader_of_ids_and_class_labels_is_refused_not_scanned_as_ids():
    """TensorDataset(ids, labels) batches are [ids, labels]: the class labels 0..2 were marked as used token ids."""
    ids = torch.tensor([[40, 41, 42], [43, 44, 45]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.tensor([0, 2])), batch_size=2)
    with pytest.raises(PemaError, match="a batch of 2 tensors .* does not say which are token ids"):
        scan_vocabulary(loader, 100)
    assert scan_vocabulary(ids, 100).tolist() == list(range(40, 46))  # the way it says to do it
    dict_loader = [{"input_ids": batch_ids, "labels": batch_labels} for batch_ids, batch_labels in loader]
    assert scan_vocabulary(dict_loader, 100).tolist() == list(range(40, 46))  # labels= is not a default column


def test_replacing_with_no_used_ids_names_emptiness_and_leaves_the_model():
    model = tiny_models.build("llama-untied")
    before = snapshot(model)
    with pytest.raises(UsedIdsError, match="used_ids is empty"):
        replace_embeddings(model, [])
    assert get_handle(model) is None
    assert_state(model, before)
