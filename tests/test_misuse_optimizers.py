"""Optimizers other than Adam on a compacted model: their state is not shaped like the compact rows (Adafactor's
factored [U] / [D] moments, LBFGS's flat history), and the optimizer-state guard used to refuse them at step 2,
blaming a loaded checkpoint. It now refuses only what is wrong: state of the full [V, ...] matrix."""

import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_models
from helpers.state import snapshot
from pema_triton import PemaError, replace_embeddings, restore_embeddings

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _compacted():
    model = tiny_models.build("llama-untied").train()
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    return model, used, ids


def _train(model, optimizer, ids, steps=3):
    def closure():
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    for _ in range(steps):
        if isinstance(optimizer, torch.optim.LBFGS):  # it re-evaluates the loss
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()


OPTIMIZERS = {
    "transformers Adafactor": lambda p: transformers.optimization.Adafactor(p, lr=1e-2, relative_step=False),
    "torch Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=2),
    "SGD with momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    # The Trainer's adamw_bnb_8bit / paged_adamw_8bit / lion_8bit: uint8 moments and a [numel / 256] absmax per
    # tensor. min_8bit_size=1 because the tiny rows (U x 32 < 4096 elements) would otherwise keep 32-bit state.
    "bitsandbytes AdamW8bit": lambda p: _bnb().optim.AdamW8bit(p, lr=1e-2, min_8bit_size=1),
    "bitsandbytes PagedAdamW8bit": lambda p: _bnb().optim.PagedAdamW8bit(p, lr=1e-2, min_8bit_size=1),
    "bitsandbytes Lion8bit": lambda p: _bnb().optim.Lion8bit(p, lr=1e-3, min_8bit_size=1),
}


def _bnb():
    """bitsandbytes (CPU support since 0.45) from the folder scripts/setup.sh installs it into, off sys.path
    otherwise: beside transformers every `import transformers` would load it (and log a CPU kernel warning)."""
    folder = str(Path(sys.prefix) / "optional" / "bitsandbytes")
    if folder not in sys.path:
        sys.path.append(folder)
    import bitsandbytes

    return bitsandbytes


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_of_any_state_shape_train_the_compact_rows(name):
    model, used, ids = _compacted()
    before = model.get_input_embeddings().weight.detach().clone()
    optimizer = OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad])
    _train(model, optimizer, ids)
    compact = model.get_input_embeddings().weight
    assert not torch.equal(compact, before)  # it trained, past step 2
    if name.startswith("bitsandbytes"):  # really 8-bit state, not a 32-bit fallback
        assert optimizer.state[compact]["state1"].dtype == torch.uint8
    full_before = snapshot(tiny_models.build("llama-untied"))["model.embed_tokens.weight"]
    restore_embeddings(model)
    unused = torch.ones(tiny_models.V, dtype=torch.bool)
    unused[used] = False
    assert torch.equal(model.get_input_embeddings().weight[unused], full_before[unused])


def test_the_trainers_adafactor_trains_checkpoints_and_resumes(tmp_path):
    """optim="adafactor", the Trainer's own: a checkpoint of [U]-row factored moments resumes."""
    pytest.importorskip("datasets")
    model, used, _ = _compacted()
    data = tiny_models.token_dataset(used, 8)
    args = tiny_models.trainer_args(tmp_path / "run", max_steps=4, save_steps=2, optim="adafactor")
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    resumed, _, _ = _compacted()
    trainer = transformers.Trainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert trainer.state.global_step == 4


def test_state_of_the_full_matrix_is_still_refused():
    """What the guard is for: [V, D] moments (an uncompacted model's checkpoint) stepped on [U, D] rows."""
    model, _, ids = _compacted()
    compact = model.get_input_embeddings().weight
    optimizer = torch.optim.Adam([compact], lr=1e-3)
    optimizer.state[compact] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(tiny_models.V, compact.shape[1]),
                                "exp_avg_sq": torch.zeros(tiny_models.V, compact.shape[1])}
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(PemaError, match="state 'exp_avg' of shape \\(97, 32\\) for compact rows"):
        optimizer.step()
