"""Misuse of the fused loss, and of labels in `restricted` mode: each case a shortest reproducer ending in the loss
the unfused model computes, or in the typed error where the unfused model raises too (tests/test_misuse.py has the
rest of the catalogue)."""


import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_models
from helpers.state import assert_state, snapshot
from pema_triton import IdOutOfRangeError, PemaError, UnsupportedModuleError, get_handle, replace_embeddings

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _pair(output="frozen", model=None, **options):
    """A tiny untied Llama compacted twice, unfused and fused, both in training mode (no dropout: equal losses)."""
    model = tiny_models.build("llama-untied") if model is None else model
    return tiny_models.unfused_and_fused(model, output, **options)


@pytest.mark.parametrize("bad", [-1, tiny_models.V])
def test_labels_outside_the_vocabulary_raise_where_the_unfused_model_raises(bad):
    unfused, fused, _, ids = _pair()
    labels = ids.clone()
    labels[0, 3] = bad
    with pytest.raises(IndexError):  # transformers' own loss: F.cross_entropy's "Target ... is out of bounds"
        unfused(input_ids=ids, labels=labels)
    with pytest.raises(IdOutOfRangeError, match=rf"labels \[{bad}\] are outside the vocabulary"):
        fused(input_ids=ids, labels=labels)  # it gave a finite loss and trained
    torch.testing.assert_close(fused(input_ids=ids, labels=ids).loss, unfused(input_ids=ids, labels=ids).loss)


def test_without_a_sync_bad_labels_count_for_nothing_until_the_check_raises():
    """check_ids="async" (True on CUDA): the step that saw the label trains on the others, the error follows."""
    unfused, fused, _, ids = _pair(check_ids="async")
    labels = ids.clone()
    labels[0, 3] = -7
    ignored = labels.clone()
    ignored[0, 3] = -100
    torch.testing.assert_close(fused(input_ids=ids, labels=labels).loss,
                               unfused(input_ids=ids, labels=ignored).loss)
    with pytest.raises(IdOutOfRangeError, match=r"labels \[-7\]"):
        get_handle(fused).check_ids()
    get_handle(fused).check_ids()  # reported once


@pytest.mark.parametrize("output", ["frozen", "restricted"])
@pytest.mark.parametrize("fused_loss", [False, True], ids=["unfused", "fused"])
def test_ignore_index_given_to_the_model_is_honoured(output, fused_loss):
    unfused, fused, _, ids = _pair(output)
    model = fused if fused_loss else unfused
    labels = ids.clone()
    labels[:, :4] = -1
    ignored = labels.clone()
    ignored[:, :4] = -100
    torch.testing.assert_close(model(input_ids=ids, labels=labels, ignore_index=-1).loss,
                               unfused(input_ids=ids, labels=ignored).loss)


@pytest.mark.parametrize("output", ["frozen", "restricted"])
@pytest.mark.parametrize("fused_loss", [False, True], ids=["unfused", "fused"])
def test_shift_labels_are_original_ids_like_labels(output, fused_loss):
    """`restricted` remapped `labels` to compact columns but read `shift_labels` as columns already."""
    unfused, fused, _, ids = _pair(output)
    model = fused if fused_loss else unfused
    shifted = F.pad(ids, (0, 1), value=-100)[:, 1:].contiguous()  # transformers' loss .view()s it
    torch.testing.assert_close(model(input_ids=ids, labels=ids, shift_labels=shifted).loss,
                               unfused(input_ids=ids, labels=ids).loss)


def test_a_forward_that_raised_leaves_nothing_for_the_next_call():
    """The labels were taken, then the embedding raised: the next call, in eval mode and without labels, returned
    the failed batch's loss and no logits."""
    _, fused, used, ids = _pair()
    unused_id = next(i for i in range(tiny_models.V) if i not in set(used.tolist()))
    bad = ids.clone()
    bad[0, 0] = unused_id
    with pytest.raises(PemaError):
        fused(input_ids=bad, labels=bad)
    fused.eval()
    out = fused(input_ids=ids)
    assert out.loss is None and out.logits.shape == (*ids.shape, tiny_models.V)


def test_a_mixture_of_experts_router_loss_is_added_as_the_model_adds_it():
    config = transformers.MixtralConfig(
        vocab_size=tiny_models.V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    unfused, fused, _, ids = _pair(model=transformers.MixtralForCausalLM(config).eval())
    want = unfused(input_ids=ids, labels=ids, output_router_logits=True)
    got = fused(input_ids=ids, labels=ids, output_router_logits=True)
    assert float(want.aux_loss) > 0
    torch.testing.assert_close(got.loss, want.loss)  # it was the cross-entropy alone


def _own_objective(logits, labels, vocab_size, **kwargs):
    return logits.float().logsumexp(-1).mean()  # not the causal-LM cross-entropy


def test_a_loss_function_set_after_replace_is_refused_not_bypassed():
    _, fused, _, ids = _pair()
    fused.loss_function = _own_objective
    with pytest.raises(UnsupportedModuleError, match="loss_function .* changed after replace_embeddings"):
        fused(input_ids=ids, labels=ids)
    fused.eval()  # outside training the fused path is off: the model's own loss runs
    torch.testing.assert_close(fused(input_ids=ids, labels=ids).loss, _own_objective(fused(input_ids=ids).logits,
                                                                                      ids, tiny_models.V))


def test_a_loss_function_set_before_replace_is_refused_by_the_probe():
    model = tiny_models.build("llama-untied")
    model.loss_function = _own_objective
    used, _ = tiny_models.used_ids_and_batch(model)
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="on a probe"):
        replace_embeddings(model, used, fused_loss=True)
    assert get_handle(model) is None
    assert_state(model, before)


def test_labels_of_another_shape_than_the_inputs_are_a_clear_error():
    _, fused, _, ids = _pair()
    with pytest.raises(PemaError, match=r"labels have shape \(2, 8\) but the inputs \(2, 9\)"):
        fused(input_ids=ids, labels=ids[:, :-1])


def test_reading_the_logits_of_a_fused_training_step_says_why_there_are_none(tmp_path):
    """A Trainer whose compute_loss logs token accuracy from `outputs.logits` (as TRL's does) crashed with
    "'NoneType' object has no attribute 'argmax'" deep inside; it is a NoLogitsError naming fused_loss. The output
    is otherwise the model's own: its items, `output[0]`, `getattr(..., None)`, repr and pickle."""
    pytest.importorskip("datasets")
    import pickle

    from pema_triton import NoLogitsError

    _, fused, used, ids = _pair()
    out = fused(input_ids=ids, labels=ids)
    assert "logits" not in out and out[0] is out.loss and getattr(out, "logits", None) is None
    assert repr(out).startswith("CausalLMOutputWithPast(")
    assert type(pickle.loads(pickle.dumps(out))) is transformers.modeling_outputs.CausalLMOutputWithPast

    class AccuracyTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            outputs = model(**inputs)
            self.accuracy = (outputs.logits.argmax(-1) == inputs["labels"]).float().mean()
            return outputs.loss

    args = tiny_models.trainer_args(tmp_path, max_steps=1)
    trainer = AccuracyTrainer(model=fused, args=args, train_dataset=tiny_models.token_dataset(used, 4))
    with pytest.raises(NoLogitsError, match=r"fused-loss training forward .* needs fused_loss=False"):
        trainer.train()
