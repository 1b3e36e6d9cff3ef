"""CompactEmbedding and CompactLMHead against the full nn.Embedding / nn.Linear they replace."""

import copy

import pytest
import torch
from torch import nn

import pema_triton
from helpers.devices import BACKENDS, DEVICE, ON_GPU
from pema_triton import CompactEmbedding, CompactLMHead
from pema_triton.errors import PemaError, UnsupportedModuleError, UnusedIdError, UsedIdsError

V, D = 500, 97
USED = torch.tensor([0, 3, 4, 17, 100, 250, 251, 499])


def _ids(shape=(4, 21), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return USED[torch.randint(0, len(USED), shape, generator=gen)].to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_idx", [None, 4])
def test_compact_embedding_equals_embedding_and_its_gradient(backend, padding_idx):
    torch.manual_seed(0)
    full = nn.Embedding(V, D, padding_idx=padding_idx).to(DEVICE)
    compact = CompactEmbedding(full, USED, backend=backend)
    ids = _ids()
    ids[0, :3] = 4  # the pad id, repeated
    grad_out = torch.randn(*ids.shape, D, device=DEVICE)

    out = compact(ids)
    assert torch.equal(out, full(ids))
    out.backward(grad_out)
    full(ids).backward(grad_out)

    torch.testing.assert_close(compact.weight.grad, full.weight.grad[USED.to(DEVICE)], atol=1e-5, rtol=0)
    if padding_idx is not None:
        assert compact.padding_row == 2 and torch.all(compact.weight.grad[2] == 0)
    assert compact.weight.shape == (len(USED), D)
    assert repr(compact).startswith(f"CompactEmbedding(num_embeddings={V}, num_used=8, embedding_dim={D}")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device: checks for device-to-host syncs")
def test_without_id_checks_a_training_step_never_syncs_with_the_host():
    """check_ids=False promises no sync per step, also for a model with a pad id (BERT, RoBERTa, XLM-R)."""
    compact = CompactEmbedding(nn.Embedding(V, D, padding_idx=4).to(DEVICE), USED, check_ids=False)
    ids = _ids()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compact(ids).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert compact.weight.grad[compact.padding_row].abs().sum() == 0


def test_adamw_state_covers_only_used_rows():
    compact = CompactEmbedding(nn.Embedding(V, D), USED).to(DEVICE)
    opt = torch.optim.AdamW(compact.parameters(), lr=1e-2, weight_decay=0.0)
    compact(_ids()).sum().backward()
    opt.step()
    state = opt.state[compact.weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (len(USED), D)
    assert [p.shape for p in compact.parameters()] == [(len(USED), D)]


def test_merge_into_writes_trained_rows_only():
    full = nn.Embedding(V, D).to(DEVICE)
    before = full.weight.detach().clone()
    compact = CompactEmbedding(full, USED)
    with torch.no_grad():
        compact.weight.add_(1.0)
    merged = compact.merge_into(full.weight.detach().clone())
    used = USED.to(DEVICE)
    assert torch.equal(merged[used], compact.weight.detach())
    unused = torch.ones(V, dtype=torch.bool, device=DEVICE)
    unused[used] = False
    assert torch.equal(merged[unused], before[unused])  # bit for bit
    assert torch.equal(full.weight, before)  # the source module was never touched
    with pytest.raises(PemaError, match=r"shape \(500, 97\)"):
        compact.merge_into(torch.zeros(V - 1, D))


@pytest.mark.parametrize(
    "used, error, match",
    [
        (torch.tensor([3, 1, 2]), UsedIdsError, "sorted"),
        (torch.tensor([1, 2, 2, 5]), UsedIdsError, r"unique; \[2\]"),
        (torch.tensor([0, 500]), UsedIdsError, r"\[500\] are outside the vocabulary \[0, 500\)"),
        (torch.tensor([-1, 2]), UsedIdsError, "outside"),
        (torch.tensor([1.0, 2.0]), UsedIdsError, "integer token ids"),
        (torch.tensor([], dtype=torch.long), UsedIdsError, "non-empty"),
    ],
    ids=["unsorted", "duplicated", "too-large", "negative", "float", "empty"],
)
def test_bad_used_ids_are_typed_errors_and_change_nothing(used, error, match):
    full = nn.Embedding(V, D)
    head = nn.Linear(D, V)
    snapshot = copy.deepcopy((full.state_dict(), head.state_dict()))
    with pytest.raises(error, match=match):
        CompactEmbedding(full, used)
    with pytest.raises(error, match=match):
        CompactLMHead(head, used)
    for module, state in zip((full, head), snapshot):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, state[name])


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"sparse": True}, {"scale_grad_by_freq": True}])
def test_unsupported_embedding_options_are_clear_errors(option):
    with pytest.raises(UnsupportedModuleError, match=next(iter(option))):
        CompactEmbedding(nn.Embedding(V, D, **option), USED)
    with pytest.raises(UnsupportedModuleError, match="needs an nn.Embedding"):
        CompactEmbedding(nn.Linear(D, V), USED)
    with pytest.raises(UnsupportedModuleError, match="needs an nn.Linear"):
        CompactLMHead(nn.Embedding(V, D), USED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_an_unused_id_names_it(backend):
    compact = CompactEmbedding(nn.Embedding(V, D), USED, backend=backend).to(DEVICE)
    weight_before = compact.weight.detach().clone()
    with pytest.raises(UnusedIdError, match=r"\[5, 6\] are not in the used vocabulary"):
        compact(torch.tensor([[0, 5, 6, 5]], device=DEVICE))
    assert torch.equal(compact.weight, weight_before)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_logits_equal_full_head_and_gradients_are_used_rows(bias):
    torch.manual_seed(0)
    full = nn.Linear(D, V, bias=bias).to(DEVICE)
    head = CompactLMHead(full, USED)
    hidden = torch.randn(3, 11, D, device=DEVICE)
    grad_logits = torch.randn(3, 11, V, device=DEVICE)

    hidden_c = hidden.clone().requires_grad_()
    logits = head(hidden_c)
    assert logits.shape == (3, 11, V)
    assert torch.equal(logits, full(hidden))  # one GEMM over the same matrix: bit-identical
    logits.backward(grad_logits)
    hidden_f = hidden.clone().requires_grad_()
    full(hidden_f).backward(grad_logits)

    used = USED.to(DEVICE)
    assert torch.equal(hidden_c.grad, hidden_f.grad)
    torch.testing.assert_close(head.weight.grad, full.weight.grad[used])
    if bias:
        torch.testing.assert_close(head.bias.grad, full.bias.grad[used])
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert all(p.shape[0] == len(USED) for p in trainable)  # nothing [V, D] trains
    assert not head.frozen_weight.requires_grad and head.frozen_weight.grad is None


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_under_autocast_matches_the_full_head(bias):
    """Mixed precision (Trainer's bf16=True): logits in the autocast dtype and the gradients nn.Linear gets."""
    torch.manual_seed(0)
    full = nn.Linear(D, V, bias=bias).to(DEVICE)
    head = CompactLMHead(copy.deepcopy(full), USED)
    hidden = torch.randn(3, 11, D, device=DEVICE)
    grads = {}
    for name, module in (("compact", head), ("full", full)):
        x = hidden.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = module(x)
        assert logits.dtype == torch.bfloat16
        logits.float().pow(2).sum().backward()
        grads[name] = (logits, x.grad, module.weight.grad, module.bias.grad if bias else None)

    (logits_c, hidden_c, weight_c, bias_c), (logits_f, hidden_f, weight_f, bias_f) = grads["compact"], grads["full"]
    used = USED.to(DEVICE)
    assert torch.equal(logits_c, logits_f)
    assert hidden_c.dtype == weight_c.dtype == torch.float32  # cast back to the Parameters' dtype
    # bf16 GEMMs on both sides; the [U] slice of the product may block differently from the [V] one.
    torch.testing.assert_close(hidden_c, hidden_f, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(weight_c, weight_f[used], rtol=1.6e-2, atol=1e-2)
    if bias:
        torch.testing.assert_close(bias_c, bias_f[used], rtol=1.6e-2, atol=1e-2)


def test_frozen_head_runs_twice_before_one_backward():
    """Two forwards (chosen and rejected sequences) then one backward: the gradients of the summed loss."""
    torch.manual_seed(0)
    full = nn.Linear(D, V).to(DEVICE)
    head = CompactLMHead(copy.deepcopy(full), USED)
    first, second = torch.randn(2, 5, D, device=DEVICE), torch.randn(3, D, device=DEVICE)
    (head(first).sum() + head(second).pow(2).sum()).backward()
    (full(first).sum() + full(second).pow(2).sum()).backward()
    used = USED.to(DEVICE)
    torch.testing.assert_close(head.weight.grad, full.weight.grad[used])
    torch.testing.assert_close(head.bias.grad, full.bias.grad[used])

    # An in-place update of the trainable rows between forward and backward is refused, as for nn.Linear.
    logits = head(first)
    with torch.no_grad():
        head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


def test_frozen_head_follows_training_of_its_used_rows():
    full = nn.Linear(D, V).to(DEVICE)
    head = CompactLMHead(full, USED)
    with torch.no_grad():
        head.weight.mul_(2.0)
        head.bias.add_(1.0)
    expected = nn.Linear(D, V).to(DEVICE)
    with torch.no_grad():
        expected.weight.copy_(full.weight)
        expected.bias.copy_(full.bias)
        head.merge_into(expected.weight, expected.bias)
    hidden = torch.randn(5, D, device=DEVICE)
    assert torch.equal(head(hidden), expected(hidden))
    with pytest.raises(PemaError, match="pass full_bias"):
        head.merge_into(full.weight.detach().clone())


@pytest.mark.parametrize("bias", [False, True])
def test_restricted_head_gives_used_columns_and_expands_to_full_vocab(bias):
    torch.manual_seed(0)
    full = nn.Linear(D, V, bias=bias).to(DEVICE)
    head = CompactLMHead(full, USED, output="restricted")
    hidden = torch.randn(2, 7, D, device=DEVICE)

    logits = head(hidden)
    assert logits.shape == (2, 7, len(USED)) and head.out_features == len(USED)
    torch.testing.assert_close(logits, full(hidden)[..., USED.to(DEVICE)])
    assert not hasattr(head, "frozen_weight")  # unused rows are not kept

    expanded = head.expand_logits(logits)
    assert expanded.shape == (2, 7, V)
    assert torch.equal(expanded[..., USED.to(DEVICE)], logits)
    assert torch.equal(expanded.argmax(-1), USED.to(DEVICE)[logits.argmax(-1)])
    assert int((expanded == torch.finfo(expanded.dtype).min).sum()) == 2 * 7 * (V - len(USED))
    with pytest.raises(PemaError, match="expected logits with 8 columns"):
        head.expand_logits(expanded)


@pytest.mark.parametrize("mode", ["frozen", "restricted"])
def test_tied_head_shares_the_embedding_parameter(mode):
    torch.manual_seed(0)
    embedding = nn.Embedding(V, D).to(DEVICE)
    tied_head = nn.Linear(D, V, bias=False).to(DEVICE)
    tied_head.weight = embedding.weight
    compact = CompactEmbedding(embedding, USED)
    head = CompactLMHead(tied_head, USED, mode, weight=compact.weight)
    assert head.weight is compact.weight

    ids = _ids((2, 9))
    head(compact(ids)).sum().backward()

    ref_weight = embedding.weight.detach().clone().requires_grad_()
    logits = torch.nn.functional.linear(torch.nn.functional.embedding(ids, ref_weight), ref_weight)
    if mode == "restricted":
        logits = logits[..., USED.to(DEVICE)]
    logits.sum().backward()
    torch.testing.assert_close(compact.weight.grad, ref_weight.grad[USED.to(DEVICE)], atol=1e-4, rtol=1e-5)
    with pytest.raises(PemaError, match="shared weight must be"):
        CompactLMHead(tied_head, USED[:-1], mode, weight=compact.weight)


def test_head_mode_is_checked():
    with pytest.raises(PemaError, match="output must be one of"):
        CompactLMHead(nn.Linear(D, V), USED, output="trimmed")


def test_public_api_is_exported():
    assert set(pema_triton.__all__) <= set(dir(pema_triton))


def test_used_ids_are_validated_once_into_a_compaction():
    """A set means its sorted ids; anything not integer ids is a UsedIdsError; a Compaction passes through."""
    compaction = pema_triton.Compaction.of({17, 0, 3}, V)
    assert compaction.used_ids.tolist() == [0, 3, 17] and compaction.num_used == 3 and compaction.vocab_size == V
    assert pema_triton.Compaction.of(compaction, V) is compaction
    head = CompactLMHead(nn.Linear(D, V), compaction)
    assert CompactEmbedding(nn.Embedding(V, D), compaction).used_ids.tolist() == head.used_ids.tolist() == [0, 3, 17]
    for bad in (["a", "b"], "abc", None):
        with pytest.raises(UsedIdsError, match="integer token ids"):
            pema_triton.Compaction.of(bad, V)
    with pytest.raises(UsedIdsError, match="compacted for V=500, this matrix has V=499"):
        CompactEmbedding(nn.Embedding(V - 1, D), compaction)
