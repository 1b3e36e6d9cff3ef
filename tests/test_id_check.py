"""The compacted embedding's bad-id check without a host sync: late but never lost, traceable, capturable."""

import pytest
import torch

from helpers.devices import BACKENDS, DEVICE, gpu_only
from pema_triton import CompactEmbedding, PemaError, UnusedIdError, replace_embeddings

V, D = 50, 8
USED = torch.tensor([1, 4, 9, 16, 25, 36, 49])


def _embedding(backend="auto", check_ids=True):
    torch.manual_seed(0)
    return CompactEmbedding(torch.nn.Embedding(V, D, device=DEVICE), USED.to(DEVICE), backend=backend,
                            check_ids=check_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_check_raises_at_the_next_forward_naming_the_ids(backend):
    emb = _embedding(backend, check_ids="async")  # what check_ids=True does on CUDA, forced on CPU
    good, bad = USED[:3].to(DEVICE), torch.tensor([4, 7, 8, 7], device=DEVICE)

    out = emb(bad)  # not raised here: the count is still on its way to the host
    assert torch.all(out[1:3] == 0) and torch.all(out[3] == 0) and torch.equal(out[0], emb.weight[1])
    with pytest.raises(UnusedIdError, match=r"\[7, 8\].*not in the used vocabulary") as err:
        emb(good)
    assert err.value.ids == [7, 8]
    emb(good)  # reported once: training that catches the error goes on
    emb.check_bad_ids()
    assert int(emb.bad_id_count) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_bad_ids_reports_the_last_forward_and_trained_rows_stay_right(backend):
    emb = _embedding(backend, check_ids="async")
    emb(USED[:2].to(DEVICE)).sum().backward()
    emb(torch.tensor([3, 4], device=DEVICE)).sum().backward()
    # The bad id got no row's gradient: only id 4's row (compact row 1) moved, by one per use.
    assert torch.equal(emb.weight.grad[:, 0], torch.tensor([1.0, 2, 0, 0, 0, 0, 0], device=DEVICE))
    with pytest.raises(UnusedIdError, match=r"\[3\]"):
        emb.check_bad_ids()


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_check_raises_in_the_forward_on_cpu_and_sync_everywhere(backend):
    for check_ids in (True, "sync"):
        emb = _embedding(backend, check_ids=check_ids)
        if DEVICE.type == "cuda" and check_ids is True:
            continue  # asynchronous there: the GPU tests below
        with pytest.raises(UnusedIdError, match=r"\[5\]"):
            emb(torch.tensor([5], device=DEVICE))
    quiet = _embedding(backend, check_ids=False)
    assert torch.all(quiet(torch.tensor([5], device=DEVICE)) == 0)
    quiet.check_bad_ids()  # off means off
    with pytest.raises(PemaError, match="check_ids must be one of"):
        _embedding(backend, check_ids="later")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_forward_has_no_graph_break_and_is_checked_later(backend):
    """fullgraph=True fails on any graph break; the compiled steps' bad ids reach the device counter."""
    torch._dynamo.reset()
    emb = _embedding(backend, check_ids=True)
    compile_backend = "eager" if backend == "triton" and DEVICE.type == "cpu" else "aot_eager"
    step = torch.compile(lambda ids: emb(ids).square().sum(), backend=compile_backend, fullgraph=True)

    step(USED[:4].to(DEVICE)).backward()
    emb.check_bad_ids()
    step(torch.tensor([2, 4], device=DEVICE))
    assert int(emb.bad_id_count) == 1
    with pytest.raises(UnusedIdError, match="compiled or graph-captured forward"):
        emb.check_bad_ids()


def _compacted_tiny_llama():
    """(model, handle, a batch of used ids, an unused id) of a tiny Llama compacted with the asynchronous check."""
    pytest.importorskip("transformers")
    from helpers import tiny_models

    model = tiny_models.build("llama-untied")
    used, batch = tiny_models.used_ids_and_batch(model)
    handle = replace_embeddings(model, used, check_ids="async")
    return model, handle, batch, next(i for i in range(tiny_models.V) if i not in set(used.tolist()))


def test_handle_checks_every_compacted_embedding():
    model, handle, batch, unused = _compacted_tiny_llama()
    model(input_ids=batch)
    handle.check_ids()
    model(input_ids=torch.tensor([[unused]]))
    with pytest.raises(UnusedIdError, match=rf"\[{unused}\]"):
        handle.check_ids()


@gpu_only
def test_cuda_forward_and_backward_do_not_sync():
    emb = _embedding("triton", check_ids=True)
    ids = USED.to(DEVICE).repeat(100)
    emb(ids).sum().backward()  # warm-up: kernels compiled, pinned-memory pool filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            emb(ids).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    emb.check_bad_ids()


@gpu_only
def test_cuda_graph_captures_a_training_step_and_the_check_sees_replays():
    emb = _embedding("triton", check_ids=True)
    static_ids = USED.to(DEVICE).repeat(10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph, as torch.cuda.graphs documents
        for _ in range(2):
            emb.weight.grad = None
            emb(static_ids).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    emb.weight.grad = None
    with torch.cuda.graph(graph):
        emb(static_ids).sum().backward()
    graph.replay()
    emb.check_bad_ids()
    static_ids[0] = 2  # unused: the replayed lookup counts it on the device
    graph.replay()
    with pytest.raises(UnusedIdError, match="compiled or graph-captured forward"):
        emb.check_bad_ids()


def test_pema_callback_checks_at_log_save_and_end_and_can_skip_step_syncs():
    model, _, batch, unused = _compacted_tiny_llama()
    from pema_triton.hf import PemaCallback

    callback = PemaCallback(time_steps=False)
    callback.on_step_begin(None, None, None)
    callback.on_step_end(None, None, None)
    assert callback.step_times == []
    for event in ("on_log", "on_save", "on_train_end"):
        model(input_ids=torch.tensor([[unused]]))
        with pytest.raises(UnusedIdError, match=rf"\[{unused}\]"):
            getattr(callback, event)(None, None, None, model=model)
    model(input_ids=batch)
    callback.on_log(None, None, None, model=model)


def test_the_async_count_is_fenced_on_the_stream_of_the_tensors_device(monkeypatch):
    """With a model spread over GPUs (device_map), an embedding on cuda:1 copies its count to the host on cuda:1's
    stream while cuda:0 is current: the event that says the copy is done must be recorded on cuda:1's stream.
    (Recorded on the current device's, query() could pass first and the host would read uninitialised memory.)
    CUDA is mocked: the streams, the event, the pinned buffer."""
    from pema_triton import id_check

    class Count:  # a [1] int32 count on cuda:1
        is_cuda, device = True, torch.device("cuda", 1)

    class Host:
        def copy_(self, source, non_blocking=False):
            self.copied = (source, non_blocking)
            return self

    class Event:
        def record(self, stream=None):
            self.stream = stream

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: Host())
    count = Count()
    event, host, _ = id_check._snapshot(torch.tensor([3]), count)
    assert event.stream == "stream of cuda:1" and host.copied == (count, True)
