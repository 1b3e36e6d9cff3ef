"""Model state snapshots, to check that a refused call changed nothing and a restore gave everything back."""

import torch


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of `model.state_dict()` (full-vocabulary while compacted)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state(model, expected: dict[str, torch.Tensor]) -> None:
    """`model.state_dict()` has exactly the keys of `expected`, each tensor bit-identical."""
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key].to(tensor.device), tensor), key
