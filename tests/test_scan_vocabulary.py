"""scan_vocabulary over every supported source, and special_token_ids."""

import pytest
import torch

from helpers.devices import BACKENDS
from pema_triton import PemaError, UsedIdsError, scan_vocabulary, special_token_ids

ROWS = [[5, 6, 7], [7, 8], [90, 5]]
LABELS = [[-100, 6, 11], [12, -100], [-100, -100]]
EXPECTED = [5, 6, 7, 8, 90]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_and_iterables(backend):
    assert scan_vocabulary(torch.tensor([[5, 6, 7], [7, 8, 90]]), 100, backend=backend).tolist() == [5, 6, 7, 8, 90]
    chunks = [torch.tensor(r) for r in ROWS]
    assert scan_vocabulary(chunks, 100, backend=backend).tolist() == EXPECTED
    assert scan_vocabulary(iter(chunks), 100, backend=backend).tolist() == EXPECTED  # a one-shot generator
    assert scan_vocabulary(ROWS, 100, backend=backend).tolist() == EXPECTED  # plain lists of ids
    assert scan_vocabulary(chunks, None, backend=backend).tolist() == EXPECTED  # V grown to the largest id
    assert scan_vocabulary(chunks, 100, keep=[0, 99], backend=backend).tolist() == [0, *EXPECTED, 99]


def test_dict_batches_dataloader_and_labels():
    batches = [{"input_ids": torch.tensor([r]), "labels": torch.tensor([lab])} for r, lab in zip(ROWS, LABELS)]
    assert scan_vocabulary(batches, 100).tolist() == EXPECTED
    # Labels hold token ids too (-100 ignored): scan them where they can differ from the inputs.
    assert scan_vocabulary(batches, 100, columns=("input_ids", "labels")).tolist() == [5, 6, 7, 8, 11, 12, 90]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([i, i + 10])}

    loader = torch.utils.data.DataLoader(Rows(), batch_size=4)
    assert scan_vocabulary(loader, 20).tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    with pytest.raises(PemaError, match="none of the columns"):
        scan_vocabulary([{"tokens": torch.tensor([1])}], 10)
    with pytest.raises(PemaError, match="cannot scan a float"):
        scan_vocabulary(3.5, 10)


def test_datasets_dataset_and_every_split_of_a_dataset_dict():
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"input_ids": ROWS, "labels": LABELS})
    test = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[-100], [4]]})
    assert scan_vocabulary(train, 100).tolist() == EXPECTED
    both = datasets.DatasetDict(train=train, test=test)
    assert scan_vocabulary(both, 100).tolist() == [1, 2, 3, *EXPECTED]
    assert scan_vocabulary(both, 100, columns=("input_ids", "labels")).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 90]
    # Selections and shuffles (an indices mapping over the same table) scan only the rows they keep.
    assert scan_vocabulary(train.select([1]), 100).tolist() == [7, 8]
    nested = datasets.Dataset.from_dict({"input_ids": [[[1, 2], [3]], [[4]]]})
    assert scan_vocabulary(nested, 10).tolist() == [1, 2, 3, 4]


def test_progress_bar_ends_at_its_total(monkeypatch):
    """The bar counts rows of a dataset (every split) and items of an iterable, so it ends full, not at 5/50000."""
    datasets = pytest.importorskip("datasets")
    tqdm_auto = pytest.importorskip("tqdm.auto")
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm_auto, "tqdm", Bar)
    rows = datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(250)], "labels": [[1]] * 250})
    both = datasets.DatasetDict(train=rows, test=rows.select(range(30)))
    batches = [{"input_ids": torch.tensor([[i]]), "labels": torch.tensor([[i]])} for i in range(7)]
    for source in (rows, both, batches, [torch.tensor([i]) for i in range(5)]):
        scan_vocabulary(source, 300, columns=("input_ids", "labels"), batch_size=100, progress=True)
    assert [(bar.n, bar.total) for bar in bars] == [(250, 250), (280, 280), (7, 7), (5, 5)]


def test_out_of_range_ids_and_keep_are_checked():
    from pema_triton import IdOutOfRangeError

    with pytest.raises(IdOutOfRangeError, match=r"\[100\] are outside the vocabulary \[0, 100\)"):
        scan_vocabulary([torch.tensor([1, 100])], 100)
    with pytest.raises(UsedIdsError, match="outside"):
        scan_vocabulary([torch.tensor([1])], 10, keep=[10])


def test_special_token_ids_of_a_real_tokenizer():
    transformers = pytest.importorskip("transformers")
    from helpers import real_assets

    tokenizer = transformers.AutoTokenizer.from_pretrained(real_assets.minilm_dir())
    ids = special_token_ids(tokenizer)
    assert ids == sorted({tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
                          tokenizer.sep_token_id, tokenizer.mask_token_id})
    assert ids == [0, 100, 101, 102, 103]  # BERT's [PAD] [UNK] [CLS] [SEP] [MASK]
