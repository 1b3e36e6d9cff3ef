"""`torch.compile(model, fullgraph=True)` of whole compacted Hugging Face models, the way users compile them, in
every mode: no graph break (fullgraph raises on any), the same losses and gradients as eager, and bad ids or labels
still caught, later, at `handle.check_ids()` (a compiled step never reads a flag back to the host).

On a CPU the ops run their PyTorch reference under `aot_eager` (AOTAutograd traces a Triton op into its launch,
which the interpreter cannot run on fake tensors); on a GPU the kernels under inductor."""

import copy

import pytest
import torch

from helpers import tiny_models
from helpers.devices import DEVICE, ON_GPU
from pema_triton import IdOutOfRangeError, UnusedIdError, get_handle, replace_embeddings

pytestmark = pytest.mark.slow  # each model compiles for a few seconds: `make test-slow`

transformers = pytest.importorskip("transformers")
BACKEND, COMPILER = ("auto", "inductor") if ON_GPU else ("torch", "aot_eager")
CASES = [("llama-untied", "frozen", False), ("llama-untied", "restricted", False), ("llama-untied", "frozen", True),
         ("llama-untied", "restricted", True), ("gemma-scaled-embedding", "frozen", False),
         ("gemma-scaled-embedding", "frozen", True)]


def _compacted(name, output, fused_loss, check_ids=True):
    model = tiny_models.build(name).train().to(DEVICE)
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output=output, fused_loss=fused_loss, backend=BACKEND, check_ids=check_ids)
    return model, used, ids.to(DEVICE)


CASE_IDS = [f"{n}-{o}{'-fused' if f else ''}" for n, o, f in CASES]


@pytest.mark.parametrize("name, output, fused_loss", CASES, ids=CASE_IDS)
def test_a_whole_compacted_model_compiles_without_a_graph_break(name, output, fused_loss):
    torch._dynamo.reset()
    model, _, ids = _compacted(name, output, fused_loss)
    eager = copy.deepcopy(model)  # a copy of a compacted model is one (EMA copies rely on it)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILER)
    for step in range(2):
        torch.manual_seed(step)  # the same dropout masks, where a model has dropout
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.manual_seed(step)
        expected = eager(input_ids=ids, labels=ids).loss
        expected.backward()
        torch.testing.assert_close(loss, expected)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads and set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_bad_ids_and_labels_of_compiled_steps_are_reported_at_check_ids():
    torch._dynamo.reset()
    model, used, ids = _compacted("llama-untied", "restricted", False)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILER)
    unused = next(i for i in range(tiny_models.V) if i not in set(used.tolist()))
    bad = ids.clone()
    bad[0, 1] = unused
    compiled(input_ids=bad, labels=ids)  # no host read in the step: the count waits on the device
    with pytest.raises(UnusedIdError, match="compiled or graph-captured forward was given token ids"):
        get_handle(model).check_ids()
    labels = ids.clone()
    labels[0, 2] = unused
    compiled(input_ids=ids, labels=labels)  # the unused label counts for nothing in that step
    with pytest.raises(UnusedIdError, match="compiled or graph-captured forward was given labels"):
        get_handle(model).check_ids()
    labels[0, 2] = tiny_models.V + 5
    compiled(input_ids=ids, labels=labels)
    with pytest.raises((UnusedIdError, IdOutOfRangeError)):
        get_handle(model).check_ids()


@pytest.mark.parametrize("check_ids", [False, "sync"])
def test_check_ids_settings_hold_under_compile(check_ids):
    """`check_ids=False` compiles to a step that counts nothing (a bad id embeds to zeros, never reported);
    "sync" cannot read the host inside a graph, so a compiled step counts and `check_ids()` reports, as for True."""
    torch._dynamo.reset()
    model, used, ids = _compacted("llama-untied", "frozen", False, check_ids=check_ids)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILER)
    torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss)
    bad = ids.clone()
    bad[0, 1] = next(i for i in range(tiny_models.V) if i not in set(used.tolist()))
    compiled(input_ids=bad, labels=ids)
    if check_ids is False:
        get_handle(model).check_ids()  # off: nothing counted, nothing raised
        assert int(model.get_input_embeddings().bad_id_count) == 0
    else:
        with pytest.raises(UnusedIdError, match="compiled or graph-captured forward was given token ids"):
            get_handle(model).check_ids()
