"""replace_embeddings(..., fused_loss=True): the model's own causal-LM loss without logits, across families."""


import pytest
import torch

from helpers import tiny_models
from helpers.devices import BACKENDS
from helpers.state import snapshot
from pema_triton import PemaError, UnsupportedModuleError, get_handle, replace_embeddings, restore_embeddings

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FAMILIES = ["llama-untied", "qwen2", "mistral", "gemma-scaled-embedding", "gpt2"]


def _pair(name, output, backend="auto"):
    """The same tiny model compacted twice, unfused and fused, both in training mode."""
    return tiny_models.unfused_and_fused(tiny_models.build(name), output, backend=backend)


def _loss_and_grads(model, ids, labels, **kwargs):
    torch.manual_seed(0)  # the same dropout masks (GPT-2) in both runs
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["frozen", "restricted"])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_fused_loss_is_the_models_own_without_logits(name, output, backend):
    unfused, fused, used, ids = _pair(name, output, backend)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored tokens
    want, want_grads = _loss_and_grads(unfused, ids, labels)
    got, got_grads = _loss_and_grads(fused, ids, labels)

    assert getattr(got, "logits", None) is None
    assert want.logits.shape[-1] == (tiny_models.V if output == "frozen" else len(used))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)
    head = fused.get_output_embeddings()
    assert head.weight.grad.shape == (len(used), 32)  # [U, D]

    fused.eval()
    unfused.eval()
    with torch.no_grad():  # eval mode, or no labels: the logits are the unfused mode's
        assert torch.equal(fused(input_ids=ids).logits, unfused(input_ids=ids).logits)
        torch.testing.assert_close(fused(input_ids=ids, labels=labels).loss, unfused(input_ids=ids, labels=labels).loss)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=int(used[0]))
    assert torch.equal(fused.generate(ids[:, :4], **kwargs), unfused.generate(ids[:, :4], **kwargs))
    restore_embeddings(fused)
    assert not hasattr(head, "fused_call") and not hasattr(head, "label_check")  # teardown_head left nothing


def test_tuple_outputs_put_the_loss_first():
    unfused, fused, used, ids = _pair("llama-untied", "frozen")
    torch.manual_seed(0)
    want = unfused(input_ids=ids, labels=ids, return_dict=False)
    got = fused(input_ids=ids, labels=ids, return_dict=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1] is None and len(got) == len(want)


def test_num_items_in_batch_sums_over_the_given_count():
    unfused, fused, used, ids = _pair("qwen2", "frozen")
    labels = ids.clone()
    labels[:, ::3] = -100
    want, _ = _loss_and_grads(unfused, ids, labels, num_items_in_batch=torch.tensor(40))
    got, _ = _loss_and_grads(fused, ids, labels, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_trainer_with_gradient_accumulation_gives_the_same_model(output, tmp_path):
    """Three optimizer steps of two micro-batches (the Trainer passes num_items_in_batch), ignored tokens."""
    pytest.importorskip("datasets")
    model = tiny_models.build("qwen2")
    used, _ = tiny_models.used_ids_and_batch(model)
    data = tiny_models.token_dataset(used, 24).map(lambda row: {"labels": [-100, -100] + row["labels"][2:]})
    trained = {}
    for fused in (False, True):
        torch.manual_seed(0)
        m = tiny_models.build("qwen2")
        replace_embeddings(m, used, output=output, fused_loss=fused)
        args = tiny_models.trainer_args(tmp_path / str(fused), max_steps=3, gradient_accumulation_steps=2,
                                        save_strategy="no", logging_steps=1)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=data)
        trainer.train()
        restore_embeddings(m)
        trained[fused] = (snapshot(m), [h["loss"] for h in trainer.state.log_history if "loss" in h])
    (plain, plain_losses), (fused_state, fused_losses) = trained[False], trained[True]
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    # Round-off in the gradients (another summation order) moves Adam's m / sqrt(v) by up to ~2 lr per step for an
    # element whose gradient is near zero (measured: 2 of 21,856 elements, 1.9e-5). Every element within that
    # bound, all but 0.1% within 1e-5.
    far, total = 0, 0
    for key, tensor in plain.items():
        diff = (fused_state[key] - tensor).abs()
        assert float(diff.max()) <= 2 * 1e-2 * 3, key
        far, total = far + int((diff > 1e-5).sum()), total + diff.numel()
    assert far <= 1e-3 * total, f"{far} of {total} elements differ by more than 1e-5"


def test_gradient_checkpointing_and_bf16_autocast():
    unfused, fused, used, ids = _pair("llama-untied", "frozen")
    for model in (unfused, fused):
        model.gradient_checkpointing_enable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _loss_and_grads(unfused, ids, ids)
        got, got_grads = _loss_and_grads(fused, ids, ids)
    # bf16 logits rounded before the unfused loss; the fused loss sums bf16 products in fp32.
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-2, atol=1e-2)
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(got_grads[key], want_grads[key], rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name, output, match", [
    ("bert-mlm", "frozen", "its LM head has a bias"),
    ("t5-shared", "frozen", "encoder-decoder"),
    ("gemma2-softcapping", "frozen", "final_logit_softcapping=30.0"),
    ("llama-untied", None, "needs output='frozen' or 'restricted'"),
])
def test_what_the_fused_path_cannot_reproduce_is_refused_and_changes_nothing(name, output, match):
    if name == "gemma2-softcapping":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=tiny_models.V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, intermediate_size=37, final_logit_softcapping=30.0)).eval()
    else:
        model = tiny_models.build(name)
    used, _ = tiny_models.used_ids_and_batch(model)
    before = snapshot(model)
    with pytest.raises((UnsupportedModuleError, PemaError), match=match):
        replace_embeddings(model, used, output=output, fused_loss=True)
    assert get_handle(model) is None
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_a_loss_the_fused_path_does_not_reproduce_fails_the_probe():
    class ScaledLoss(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out["loss"] = out.loss * 2  # a custom objective the fused head knows nothing about
            return out

    model = ScaledLoss(tiny_models.build("llama-untied").config).eval()
    used, _ = tiny_models.used_ids_and_batch(model)
    with pytest.raises(UnsupportedModuleError, match="on a probe"):
        replace_embeddings(model, used, fused_loss=True)
    assert get_handle(model) is None
