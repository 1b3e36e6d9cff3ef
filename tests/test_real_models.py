"""The core promise on real pretrained models and real text, through the reference and the Triton path.

- MiniLM (BERT encoder, untied input embedding) fine-tuned for classification: PEMA *is* full fine-tuning.
- SmolLM2-135M (Llama, tied): PEMA `frozen` is full fine-tuning with the unused rows frozen (a gradient hook),
  PEMA `restricted` is that plus a softmax over the used ids (a logit mask), both built here in plain PyTorch.
k AdamW steps (weight decay 0), losses compared step by step and every weight after restore.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import real_assets
from helpers.devices import BACKENDS, DEVICE, ON_GPU
from helpers.training import STEPS
from helpers.training import assert_same_training as _assert_same_training
from helpers.training import train as _train
from pema_triton import replace_embeddings, restore_embeddings, scan_vocabulary, special_token_ids

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_classification_is_exactly_full_fine_tuning(backend):
    path = real_assets.minilm_dir()
    texts, labels = real_assets.bbc_news(4 * STEPS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    enc = tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    batches = [
        {"input_ids": enc["input_ids"][i : i + 4], "attention_mask": enc["attention_mask"][i : i + 4],
         "labels": torch.tensor(labels[i : i + 4])}
        for i in range(0, 4 * STEPS, 4)
    ]
    used = scan_vocabulary(batches, len(tokenizer), keep=special_token_ids(tokenizer))

    def run(pema):
        torch.manual_seed(0)  # the same fresh classifier head
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).train()
        model.to(DEVICE)
        pretrained = model.get_input_embeddings().weight.detach().clone()
        if pema:
            handle = replace_embeddings(model, used, backend=backend)
            assert handle.params_after < handle.params_before
        losses = _train(model, batches, lambda m, b: m(**b).loss)
        if pema:
            restore_embeddings(model)
        return losses, model.state_dict(), pretrained

    base_losses, base_state, pretrained = run(pema=False)
    pema_losses, pema_state, _ = run(pema=True)

    key = "bert.embeddings.word_embeddings.weight"
    # On CPU both paths sum each row's gradient in the same order: bit for bit. GPU atomics reorder the sums.
    _assert_same_training(pema_losses, base_losses, pema_state, base_state, exact=not ON_GPU, embedding_key=key)
    unused = torch.ones(len(tokenizer), dtype=torch.bool, device=DEVICE)
    unused[used] = False
    assert torch.equal(pema_state[key][unused], pretrained[unused])  # bit for bit, and full FT agrees:
    assert torch.equal(base_state[key][unused], pretrained[unused])
    assert not torch.equal(pema_state[key][used], pretrained[used])  # the used rows did train


@pytest.mark.slow  # real SmolLM2-135M
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_smollm2_causal_lm_equals_its_frozen_baseline(output, backend):
    tokenizer, base_model = real_assets.smollm2()
    base_model.to(DEVICE)
    texts, _ = real_assets.bbc_news(2 * STEPS)
    ids = tokenizer(texts, truncation=True, max_length=24, return_tensors="pt")["input_ids"]
    batches = [ids[i : i + 2] for i in range(0, 2 * STEPS, 2)]
    used = scan_vocabulary(batches, len(tokenizer), keep=special_token_ids(tokenizer))
    in_used = torch.zeros(len(tokenizer), dtype=torch.bool, device=DEVICE)
    in_used[used] = True
    pretrained = base_model.get_input_embeddings().weight.detach().clone()
    assert base_model.get_output_embeddings().weight is base_model.get_input_embeddings().weight  # tied

    # Baseline: plain PyTorch full fine-tuning, unused rows frozen by a gradient hook; `restricted` also masks
    # the unused logits out of the softmax (a constant there, so those rows get no gradient either way).
    baseline = real_assets.smollm2()[1].train().to(DEVICE)
    baseline.get_input_embeddings().weight.register_hook(lambda g: g * in_used[:, None])

    def baseline_loss(model, batch):
        if output == "frozen":
            return model(input_ids=batch, labels=batch).loss
        logits = model(input_ids=batch).logits.masked_fill(~in_used, torch.finfo(torch.float32).min)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    base_losses = _train(baseline, batches, baseline_loss)

    pema = base_model.train()
    handle = replace_embeddings(pema, used, output=output, backend=backend, tokenizer=tokenizer)
    assert handle.tied and pema.get_output_embeddings().weight is pema.get_input_embeddings().weight
    pema_losses = _train(pema, batches, lambda m, b: m(input_ids=b, labels=b).loss)  # the model's own loss
    restore_embeddings(pema)
    assert pema.get_output_embeddings().weight is pema.get_input_embeddings().weight  # still tied

    # `frozen` runs the same GEMMs as the baseline: bit for bit on CPU. `restricted` drops V - U softmax columns.
    _assert_same_training(pema_losses, base_losses, pema.state_dict(), baseline.state_dict(),
                          exact=output == "frozen" and not ON_GPU, embedding_key="model.embed_tokens.weight")
    weight = pema.get_input_embeddings().weight.detach()
    assert torch.equal(weight[~in_used], pretrained[~in_used])


# The fused loss streams all V = 49,152 rows per token: the Triton interpreter would take minutes on these shapes,
# so on CPU the real-model tests run its PyTorch reference (the kernels are tested against it in
# test_linear_cross_entropy.py); on a GPU, the kernels.
FUSED_BACKEND = "auto" if ON_GPU else "torch"


@pytest.mark.slow  # real SmolLM2-135M
@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_smollm2_fused_loss_trains_as_the_unfused_head(output):
    tokenizer, _ = real_assets.smollm2()
    texts, _ = real_assets.bbc_news(2 * STEPS)
    ids = tokenizer(texts, truncation=True, max_length=48, return_tensors="pt")["input_ids"]
    batches = [ids[i : i + 2] for i in range(0, 2 * STEPS, 2)]
    used = scan_vocabulary(batches, len(tokenizer), keep=special_token_ids(tokenizer))
    runs = {}
    for fused in (False, True):
        model = real_assets.smollm2()[1].train().to(DEVICE)
        replace_embeddings(model, used, output=output, fused_loss=fused, backend=FUSED_BACKEND)
        losses = _train(model, batches, lambda m, b: m(input_ids=b, labels=b).loss)
        restore_embeddings(model)
        runs[fused] = (losses, model.state_dict())
    (plain_losses, plain_state), (fused_losses, fused_state) = runs[False], runs[True]
    # The fused loss computes its softmax and logit gradient itself (not F.cross_entropy's) and sums the head gradient
    # by chunks of tokens: every layer's gradient differs by round-off, which Adam amplifies where a gradient is near
    # zero (measured 0.012% of elements with the first design).
    _assert_same_training(fused_losses, plain_losses, fused_state, plain_state, exact=False, embedding_key=None,
                          far_fraction=1e-3)
    key = "model.embed_tokens.weight"
    unused = torch.ones(len(tokenizer), dtype=torch.bool, device=DEVICE)
    unused[used] = False
    assert torch.equal(fused_state[key][unused], plain_state[key][unused])  # untouched in both, bit for bit


@pytest.mark.slow  # real SmolLM2-135M
def test_smollm2_fused_loss_creates_no_logits_and_no_vocabulary_sized_tensor(monkeypatch):
    """4 x 256 tokens of real text: forward + backward create no tensor over one chunk of logits (the chunk held
    to 16 MiB here: 4.2M fp32 logits, where the [N, V] logits are 50.3M) and none of [V, D] size (the frozen
    buffer's rows are rewritten in place); the head's gradient is [U, D]."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from pema_triton.ops import linear_cross_entropy

    chunk_bytes = 16 * 2**20
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_BYTES", {"cpu": chunk_bytes, "cuda": chunk_bytes})
    tokenizer, model = real_assets.smollm2()
    texts, _ = real_assets.bbc_news(4)
    ids = tokenizer(texts, truncation=True, max_length=256, padding="max_length", return_tensors="pt")["input_ids"]
    used = scan_vocabulary(ids, len(tokenizer), keep=special_token_ids(tokenizer))
    model.train().to(DEVICE)
    replace_embeddings(model, used, fused_loss=True, backend=FUSED_BACKEND)
    vocab_size, dim = model.get_input_embeddings().num_embeddings, model.get_input_embeddings().embedding_dim
    limit = chunk_bytes // 4
    assert limit < ids.numel() * vocab_size // 8  # several chunks

    class Sizes(TorchDispatchMode):
        largest, vocabulary_sized = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                # An output in an input's memory (in place, a view) is not a new tensor.
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in given:
                    Sizes.largest = max(Sizes.largest, tensor.numel())
                    if tuple(tensor.shape) == (vocab_size, dim):
                        Sizes.vocabulary_sized.append(str(func))
            return out

    batch = ids.to(DEVICE)
    with Sizes():
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
    assert getattr(out, "logits", None) is None and torch.isfinite(out.loss)
    assert Sizes.largest <= limit, f"a tensor of {Sizes.largest:,} elements (limit {limit:,})"
    assert not Sizes.vocabulary_sized, Sizes.vocabulary_sized
    assert model.get_input_embeddings().weight.grad.shape == (len(used), dim)  # tied: one [U, D] gradient
