"""The public ops check what they are given and raise a typed error before any kernel runs: a remap that points
past the compact matrix used to read (lookup) or write (backward) outside it."""

import pytest
import torch

from helpers import tiny_models
from helpers.devices import BACKENDS, DEVICE
from pema_triton import (
    IdOutOfRangeError,
    PemaError,
    UsedIdsError,
    build_remap,
    compact_embedding,
    compact_embedding_backward,
    replace_embeddings,
)

pytestmark = pytest.mark.usefixtures("nan_empty")


def _remap_past_the_matrix():
    remap = build_remap(torch.tensor([2, 5, 7]), 10).to(DEVICE)
    remap[9] = 3  # a 4th row of a 3-row matrix
    return remap


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_remap_pointing_past_the_matrix_is_refused_by_the_lookup_and_its_backward(backend):
    remap, weight, ids = _remap_past_the_matrix(), torch.randn(3, 4, device=DEVICE), torch.tensor([9], device=DEVICE)
    with pytest.raises(PemaError, match=r"remap holds rows in \[-1, 3\] but the compact matrix has 3 rows"):
        compact_embedding(ids, remap, weight, backend=backend)
    with pytest.raises(PemaError, match="3 rows"):
        compact_embedding_backward(torch.ones(1, 4, device=DEVICE), ids, remap, 3, backend=backend)
    remap[9] = -2
    with pytest.raises(PemaError, match=r"rows in \[-2, 2\]"):
        compact_embedding(ids, remap, weight, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_changed_in_place_after_a_good_call_is_checked_again(backend):
    remap, weight = build_remap(torch.tensor([2, 5, 7]), 10).to(DEVICE), torch.randn(3, 4, device=DEVICE)
    ids = torch.tensor([2, 7], device=DEVICE)
    compact_embedding(ids, remap, weight, backend=backend)  # checked, and remembered
    remap[9] = 5
    with pytest.raises(PemaError, match="3 rows"):
        compact_embedding(ids, remap, weight, backend=backend)


@pytest.mark.parametrize("padding_row", [3, -2])
def test_a_padding_row_outside_the_matrix_is_refused(padding_row):
    remap, weight = build_remap(torch.tensor([2, 5, 7]), 10).to(DEVICE), torch.randn(3, 4, device=DEVICE)
    ids = torch.tensor([2], device=DEVICE)
    with pytest.raises(PemaError, match="padding_row must be -1"):
        compact_embedding(ids, remap, weight, padding_row=padding_row)
    with pytest.raises(PemaError, match="padding_row must be -1"):
        compact_embedding_backward(torch.ones(1, 4, device=DEVICE), ids, remap, 3, padding_row=padding_row)


@pytest.mark.parametrize("used, match", [([5, 2], "sorted"), ([2, 2], "unique"), ([2, 10], "outside"),
                                         ([], "empty"), ([0.5], "integer")])
def test_build_remap_refuses_what_is_no_set_of_used_ids(used, match):
    with pytest.raises(UsedIdsError, match=match):
        build_remap(torch.tensor(used) if used and isinstance(used[0], float) else used, 10)


@pytest.mark.parametrize("column", [-1, 99])
def test_columns_outside_the_used_ids_do_not_wrap(column):
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model, num_used=40)
    handle = replace_embeddings(model, used, output="restricted")
    assert handle.columns_to_ids(torch.tensor([0, len(used) - 1])).tolist() == [used[0], used[-1]]
    with pytest.raises(IdOutOfRangeError, match=f"columns \\[{column}\\]"):
        handle.columns_to_ids(torch.tensor([0, column]))
