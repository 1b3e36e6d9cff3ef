"""The headline claims on the smallest models that show them, in the fast tier: 3 AdamW steps with PEMA against the
plain-PyTorch training it promises to equal, on a BERT classifier (untied input embedding, no LM head), an untied
Llama and a tied GPT-2, in both head modes and on both backends.

- Input embedding of an untied model: PEMA *is* full fine-tuning (an unused row's gradient is exactly zero).
- `frozen`: full fine-tuning with the unused rows of the embedding and head frozen (a gradient hook), bit for bit
  on CPU: the logits come from the same GEMM.
- `restricted`: that plus a softmax over the used ids (a logit mask), to fp32 round-off (a GEMM over U columns).
The real-model versions (MiniLM, SmolLM2) are in tests/test_real_models.py (slow tier).
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_models
from helpers.devices import BACKENDS, DEVICE, ON_GPU
from helpers.training import STEPS, assert_same_training, freeze_rows_outside, train
from pema_triton import replace_embeddings, restore_embeddings

pytest.importorskip("transformers")

EMBEDDING_KEY = {"bert-classifier": "bert.embeddings.word_embeddings.weight",
                 "llama-untied": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}
CASES = [("bert-classifier", "frozen"), ("llama-untied", "frozen"), ("llama-untied", "restricted"),
         ("gpt2", "frozen"), ("gpt2", "restricted")]


def _batches(name, used):
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        ids = used[torch.randint(0, len(used), (2, 9), generator=gen)]
        if name == "bert-classifier":
            batches.append({"input_ids": ids, "labels": torch.randint(0, 3, (2,), generator=gen)})
        else:
            batches.append({"input_ids": ids, "labels": ids})
    return batches


def _baseline_loss(output, in_used):
    def loss(model, batch):
        if output == "frozen":
            return model(**batch).loss
        # `restricted`: the softmax over the used ids only; the unused logits are a constant, so no gradient.
        logits = model(input_ids=batch["input_ids"]).logits.masked_fill(~in_used, torch.finfo(torch.float32).min)
        labels = batch["labels"]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, output", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_three_adamw_steps_equal_the_plain_pytorch_baseline(name, output, backend):
    used, _ = tiny_models.used_ids_and_batch(tiny_models.build(name), num_used=40)
    in_used = torch.zeros(tiny_models.V, dtype=torch.bool, device=DEVICE)
    in_used[used.to(DEVICE)] = True
    batches = _batches(name, used)
    tied = name == "gpt2"

    baseline = tiny_models.build(name).train().to(DEVICE)
    pretrained = baseline.get_input_embeddings().weight.detach().clone()
    if name != "bert-classifier":  # a classifier's input embedding needs no hook: unused rows get a zero gradient
        freeze_rows_outside(baseline, in_used.nonzero().flatten())
    base_losses = train(baseline, batches, _baseline_loss(output, in_used))

    pema = tiny_models.build(name).train().to(DEVICE)
    handle = replace_embeddings(pema, used, output=output, backend=backend)
    assert handle.tied == tied and handle.params_after < handle.params_before
    pema_losses = train(pema, batches, lambda model, batch: model(**batch).loss)  # the model's own loss
    restore_embeddings(pema)
    if tied:
        assert pema.get_output_embeddings().weight is pema.get_input_embeddings().weight

    exact = output == "frozen" and not ON_GPU  # GPU atomics reorder the sums; `restricted` drops V - U columns
    assert_same_training(pema_losses, base_losses, pema.state_dict(), baseline.state_dict(), exact=exact,
                         embedding_key=EMBEDDING_KEY[name])
    weight = pema.get_input_embeddings().weight.detach()
    assert torch.equal(weight[~in_used], pretrained[~in_used])  # unused rows bit for bit
    assert not torch.equal(weight[in_used], pretrained[in_used])  # the used rows did train
