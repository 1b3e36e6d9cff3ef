"""replace_embeddings / restore_embeddings across architectures (tiny random configs)."""

import pytest
import torch
from conftest import BACKENDS

import tiny_models
from pema_triton import (
    AlreadyCompactedError,
    CompactEmbedding,
    CompactLMHead,
    NotCompactedError,
    get_handle,
    replace_embeddings,
    restore_embeddings,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _structure(model):
    """Module classes, and which parameter names share one tensor (the ties)."""
    classes = {name: type(m) for name, m in model.named_modules()}
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return classes, sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", tiny_models.NAMES)
def test_frozen_gives_the_original_outputs_and_restores_exactly(name, backend):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    before = _snapshot(model)
    structure = _structure(model)
    with torch.no_grad():
        expected = tiny_models.call(model, ids)

    handle = replace_embeddings(model, used, backend=backend)

    assert isinstance(model.get_input_embeddings(), CompactEmbedding)
    has_head = model.get_output_embeddings() is not None
    assert isinstance(model.get_output_embeddings(), CompactLMHead) == has_head
    with torch.no_grad():
        got = tiny_models.call(model, ids)
    assert torch.equal(got, expected)
    state = model.state_dict()  # full-vocabulary tensors under the original names
    assert state.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.equal(state[key].to(tensor.device), tensor), key
    assert handle.num_used == len(used) and handle.vocab_size == tiny_models.V
    assert handle.state_bytes_after < handle.state_bytes_before

    restore_embeddings(model)

    assert get_handle(model) is None
    assert _structure(model) == structure  # classes back, ties as before
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("name", [n for n in tiny_models.NAMES if n != "bert-classifier"])
def test_restricted_gives_the_used_columns(name):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    with torch.no_grad():
        expected = tiny_models.call(model, ids)

    replace_embeddings(model, used, output="restricted")

    with torch.no_grad():
        got = tiny_models.call(model, ids)
    assert got.shape[-1] == len(used)
    torch.testing.assert_close(got, expected[..., used], atol=1e-5, rtol=1e-5)
    assert model.config.vocab_size == len(used)  # agrees with the logits while compacted
    restore_embeddings(model)
    assert model.config.vocab_size == tiny_models.V


def test_double_replace_and_restore_without_replace_are_typed_errors():
    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    with pytest.raises(NotCompactedError, match="not compacted"):
        restore_embeddings(model)
    replace_embeddings(model, used)
    with pytest.raises(AlreadyCompactedError, match="already compacted"):
        replace_embeddings(model, used)
    restore_embeddings(model)
