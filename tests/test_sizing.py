"""`pema_triton.estimate`: training-state bytes per mode from a model's shape, built on the meta device. Each
figure equals what the compacted model really holds when compacted for real."""

import pytest
import torch

from helpers import tiny_models
from pema_triton import PemaError, estimate, replace_embeddings

transformers = pytest.importorskip("transformers")


def _held(model) -> dict[str, int]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"weights": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
            "gradients": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer": sum(2 * p.numel() * p.element_size() for p in trainable)}  # AdamW's two moments


@pytest.mark.parametrize("name", ["llama-untied", "gpt2"])
def test_every_mode_equals_what_a_real_compaction_holds(name):
    used, _ = tiny_models.used_ids_and_batch(tiny_models.build(name))
    sizes = estimate(tiny_models.build(name), used, tokens_per_step=10)
    assert {k: sizes["full"][k] for k in ("weights", "gradients", "optimizer")} == _held(tiny_models.build(name))
    for mode, output, fused in [("frozen", "frozen", False), ("restricted", "restricted", False),
                                ("fused frozen", "frozen", True)]:
        model = tiny_models.build(name).train()
        replace_embeddings(model, used, output=output, fused_loss=fused)
        held = _held(model)
        # On the CPU the head's [U] int64 used_ids buffer is the embedding's own tensor; moved to a device (as on
        # meta) each module holds its copy: the estimate counts the device's.
        assert 0 <= sizes[mode]["weights"] - held.pop("weights") <= 8 * len(used), mode
        assert {k: sizes[mode][k] for k in ("gradients", "optimizer")} == held, mode
    assert sizes["full"]["logits"] == 10 * tiny_models.V * 4 and sizes["restricted"]["logits"] == 10 * len(used) * 4
    assert sizes["fused frozen"]["logits"] == 0
    assert sizes["frozen"]["optimizer"] < sizes["full"]["optimizer"]


def test_a_config_is_enough_and_nothing_is_allocated():
    """Llama-3-8B's shape in bf16 from its config alone (a 16 GB model; the meta device holds no memory)."""
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      architectures=["LlamaForCausalLM"])
    sizes = estimate(config, torch.arange(0, 128256, 4), dtype=torch.bfloat16, optimizer="adamw_8bit")
    vocab_rows = 128256 * 4096 * 2  # one [V, D] bf16 matrix
    # Untied: both matrices lose 3/4 of their rows; restricted adds [V] int32 remap tables (and a few scalars).
    assert sizes["full"]["weights"] - sizes["restricted"]["weights"] == pytest.approx(2 * vocab_rows * 3 // 4,
                                                                                      abs=2 * 128256 * 4 + 64)
    assert sizes["full"]["optimizer"] == sizes["full"]["gradients"]  # 8-bit: 2 bytes an element, as bf16's grad


def test_bad_arguments_are_typed_errors():
    with pytest.raises(PemaError, match="optimizer must be one of"):
        estimate(tiny_models.build("gpt2"), [1, 2], optimizer="adagrad")
    with pytest.raises(PemaError, match="needs a Hugging Face model or config"):
        estimate(torch.nn.Linear(2, 2), [1])
