"""replace_embeddings / restore_embeddings across architectures (tiny random configs)."""

import pytest
import torch

from helpers import tiny_models
from helpers.devices import BACKENDS
from helpers.state import snapshot as _snapshot
from pema_triton import (
    AlreadyCompactedError,
    CompactEmbedding,
    CompactLMHead,
    NotCompactedError,
    PemaError,
    PemaWarning,
    UnsupportedModuleError,
    UnusedIdError,
    UsedIdsError,
    VocabularySizeError,
    get_handle,
    replace_embeddings,
    restore_embeddings,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _structure(model):
    """Module classes, and which parameter names share one tensor (the ties)."""
    classes = {name: type(m) for name, m in model.named_modules()}
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return classes, sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", tiny_models.NAMES)
def test_frozen_gives_the_original_outputs_and_restores_exactly(name, backend):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    before = _snapshot(model)
    structure = _structure(model)
    with torch.no_grad():
        expected = tiny_models.call(model, ids)

    handle = replace_embeddings(model, used, backend=backend)

    assert isinstance(model.get_input_embeddings(), CompactEmbedding)
    has_head = model.get_output_embeddings() is not None
    assert isinstance(model.get_output_embeddings(), CompactLMHead) == has_head
    with torch.no_grad():
        got = tiny_models.call(model, ids)
    assert torch.equal(got, expected)
    state = model.state_dict()  # full-vocabulary tensors under the original names
    assert state.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.equal(state[key].to(tensor.device), tensor), key
    assert handle.num_used == len(used) and handle.vocab_size == tiny_models.V
    assert handle.state_bytes_after < handle.state_bytes_before

    restore_embeddings(model)

    assert get_handle(model) is None
    assert _structure(model) == structure  # classes back, ties as before
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("name", [n for n in tiny_models.NAMES if n != "bert-classifier"])
def test_restricted_gives_the_used_columns(name):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    with torch.no_grad():
        expected = tiny_models.call(model, ids)

    replace_embeddings(model, used, output="restricted")

    with torch.no_grad():
        got = tiny_models.call(model, ids)
    assert got.shape[-1] == len(used)
    torch.testing.assert_close(got, expected[..., used], atol=1e-5, rtol=1e-5)
    assert model.config.vocab_size == len(used)  # agrees with the logits while compacted
    restore_embeddings(model)
    assert model.config.vocab_size == tiny_models.V


def test_double_replace_and_restore_without_replace_are_typed_errors():
    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    with pytest.raises(NotCompactedError, match="not compacted"):
        restore_embeddings(model)
    replace_embeddings(model, used)
    with pytest.raises(AlreadyCompactedError, match="already compacted"):
        replace_embeddings(model, used)
    restore_embeddings(model)


class _NoEmbeddings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)


class _BypassingEmbedding(torch.nn.Embedding):
    """An embedding subclass that reads its weight directly instead of through nn.Embedding.forward."""

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.weight) * 2


def _assert_unchanged(model, before, structure):
    assert get_handle(model) is None
    assert _structure(model) == structure
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_bad_models_are_typed_errors_naming_the_module_and_change_nothing():
    with pytest.raises(UnsupportedModuleError, match="_NoEmbeddings has no input embedding"):
        replace_embeddings(_NoEmbeddings(), [0, 1])

    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    before, structure = _snapshot(model), _structure(model)
    model.model.embed_tokens = torch.nn.Sequential(model.model.embed_tokens)  # not an nn.Embedding
    with pytest.raises(UnsupportedModuleError, match=r"'model.embed_tokens' .* is a Sequential"):
        replace_embeddings(model, used)
    model.model.embed_tokens = model.model.embed_tokens[0]
    _assert_unchanged(model, before, structure)

    # A subclass whose forward bypasses nn.Embedding.forward would silently read wrong rows: the probe refuses it
    # and rolls back the head that was already converted.
    model.model.embed_tokens.__class__ = _BypassingEmbedding
    with pytest.raises(UnsupportedModuleError, match=r"'model.embed_tokens' \(_BypassingEmbedding\) gives different"):
        replace_embeddings(model, used)
    assert type(model.model.embed_tokens) is _BypassingEmbedding
    model.model.embed_tokens.__class__ = torch.nn.Embedding
    _assert_unchanged(model, before, structure)


def test_output_none_compacts_the_input_only_and_refuses_to_untie():
    model = tiny_models.build("gpt2")  # tied
    used, _ = tiny_models.used_ids_and_batch(model)
    before, structure = _snapshot(model), _structure(model)
    with pytest.raises(PemaError, match="silently untying them"):
        replace_embeddings(model, used, output=None)
    _assert_unchanged(model, before, structure)

    untied = tiny_models.build("llama-untied")
    replace_embeddings(untied, tiny_models.used_ids_and_batch(untied)[0], output=None)
    assert isinstance(untied.get_input_embeddings(), CompactEmbedding)
    assert type(untied.get_output_embeddings()) is torch.nn.Linear
    restore_embeddings(untied)


def test_used_ids_missing_special_tokens_warn_and_bad_used_ids_change_nothing():
    model = tiny_models.build("llama-untied")
    before, structure = _snapshot(model), _structure(model)
    with pytest.warns(PemaWarning, match=r"lack special tokens \{'pad_token_id': 0\}|lack special tokens"):
        replace_embeddings(model, [3, 4, 5])
    restore_embeddings(model)
    with pytest.raises(UsedIdsError, match="sorted"):
        replace_embeddings(model, [5, 4, 3])
    with pytest.raises(UsedIdsError, match=r"\[97\] are outside"):
        replace_embeddings(model, [3, 97])
    _assert_unchanged(model, before, structure)


@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_a_batch_outside_the_scanned_set_names_the_ids(output):
    model = tiny_models.build("qwen2")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output=output)
    unused = [i for i in range(tiny_models.V) if i not in used.tolist()][:2]
    bad = ids.clone()
    bad[0, :2] = torch.tensor(unused)
    with pytest.raises(UnusedIdError, match=rf"token ids \[{unused[0]}, {unused[1]}\] are not in the used vocabulary"):
        model(input_ids=bad)
    if output == "restricted":
        with pytest.raises(UnusedIdError, match=rf"labels \[{unused[0]}, {unused[1]}\]"):
            model(input_ids=ids, labels=bad)


@pytest.mark.parametrize("name", ["llama-untied", "bert-mlm", "t5-shared"])
def test_restricted_builtin_loss_uses_remapped_labels(name):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    labels = ids.clone()
    labels[:, :2] = -100  # ignored labels pass through
    with torch.no_grad():
        full_logits = tiny_models.call(model, ids)
    # The restricted objective: cross-entropy under a softmax over the used ids only, labels as positions in `used`.
    masked = torch.full_like(full_logits, torch.finfo(full_logits.dtype).min)
    masked[..., used] = full_logits[..., used]
    if model.config.is_encoder_decoder:
        with torch.no_grad():
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
            masked_logits = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        masked = torch.full_like(masked_logits, torch.finfo(masked_logits.dtype).min)
        masked[..., used] = masked_logits[..., used]
        expected = torch.nn.functional.cross_entropy(masked.reshape(-1, tiny_models.V), labels.reshape(-1))
    elif name == "bert-mlm":
        expected = torch.nn.functional.cross_entropy(masked.reshape(-1, tiny_models.V), labels.reshape(-1))
    else:
        expected = torch.nn.functional.cross_entropy(masked[:, :-1].reshape(-1, tiny_models.V),
                                                     labels[:, 1:].reshape(-1))

    replace_embeddings(model, used, output="restricted")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["llama-untied", "gpt2", "t5-shared"])
def test_generate_while_restricted_emits_only_used_original_ids(name):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=int(used[0]))
    # Greedy decoding under the restricted head is greedy decoding of the original over the used ids.
    unused = sorted(set(range(tiny_models.V)) - set(used.tolist()))
    expected = model.generate(ids[:, :4], suppress_tokens=unused, **kwargs)
    replace_embeddings(model, used, output="restricted")
    out = model.generate(ids[:, :4], **kwargs)
    assert out.shape[-1] > 4 if not model.config.is_encoder_decoder else out.shape[-1] > 1
    assert set(out.flatten().tolist()) <= set(used.tolist())
    assert torch.equal(out, expected)
    assert model.config.vocab_size == len(used)  # back to restricted after generate
    restore_embeddings(model)
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("output", ["frozen", "restricted"])
@pytest.mark.parametrize("name", ["gpt2", "llama-untied", "bert-mlm"])
def test_checkpoints_are_full_vocabulary_and_load_back(name, output, tmp_path):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    pristine = _snapshot(model)
    replace_embeddings(model, used, output=output)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # "training"
    model.save_pretrained(tmp_path)
    trained = model.state_dict()

    reloaded = type(model).from_pretrained(tmp_path).eval()  # plain transformers, no pema_triton
    assert reloaded.config.vocab_size == tiny_models.V
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[key].to(tensor.device)), key

    # Loading the pristine full checkpoint into the compacted model brings back every row, used or not.
    model.load_state_dict(pristine)
    restore_embeddings(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, pristine[key]), key


@pytest.mark.parametrize("name", ["gpt2", "llama-untied"])
def test_every_state_dict_holds_the_rows_trained_so_far_even_under_fused_adamw(name):
    """Fused AdamW (the Trainer's default optimizer) updates the compact rows without bumping their version
    counter: a cache keyed by it made every checkpoint after the first hold the rows of the first."""
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    states = []
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    restore_embeddings(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(states[-1][key], tensor), key
    embedding = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
    assert not torch.equal(states[0][embedding], states[1][embedding])


def test_a_checkpoint_of_another_vocabulary_is_refused():
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    state = model.state_dict()
    state["model.embed_tokens.weight"] = torch.zeros(tiny_models.V + 3, 32)
    with pytest.raises(VocabularySizeError, match=r"\(100, 32\).*V=97"):
        model.load_state_dict(state)

    # Only the head is of another vocabulary: nothing loads, not even the input matrix that comes first.
    before = model.state_dict()
    state = {key: torch.full_like(tensor, 7) if tensor.is_floating_point() else tensor
             for key, tensor in before.items()}
    state["lm_head.weight"] = torch.zeros(tiny_models.V + 3, 32)
    with pytest.raises(VocabularySizeError, match="'lm_head.weight' has shape"):
        model.load_state_dict(state)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    restore_embeddings(model)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_hf_trainer_trains_saves_and_resumes(output, tmp_path):
    pytest.importorskip("datasets")
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    data = tiny_models.token_dataset(used, 16)

    def trained(resume_from=None, max_steps=6):
        torch.manual_seed(0)
        m = tiny_models.build("llama-untied")
        replace_embeddings(m, used, output=output)
        args = tiny_models.trainer_args(tmp_path / "run", max_steps=max_steps, save_steps=3, logging_steps=1)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume_from)
        restore_embeddings(m)
        return m, trainer

    straight, trainer = trained()
    assert trainer.state.log_history[0]["loss"] > trainer.state.log_history[-2]["loss"]  # it learned something
    resumed, _ = trained(resume_from=str(tmp_path / "run" / "checkpoint-3"))
    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)


def test_pema_callback_measures_and_restores_at_the_end_of_training(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pema_triton.hf import PemaCallback

    model = tiny_models.build("gpt2")
    used, _ = tiny_models.used_ids_and_batch(model)
    before = _snapshot(model)
    rows = [used[torch.randint(0, len(used), (10,))].tolist() for _ in range(8)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    replace_embeddings(model, used)
    callback = PemaCallback()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

    summary = callback.summary()
    assert get_handle(model) is None and type(model.get_input_embeddings()) is torch.nn.Embedding  # restored
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert len(callback.step_times) == 3 and summary["mean_step_seconds"] > 0
    assert summary["pema"]["num_used"] == len(used)
    # Optimizer state was measured while compacted: two fp32 moments for every parameter, the tied matrix's U rows.
    full_params = sum(p.numel() for p in tiny_models.build("gpt2").parameters())
    assert summary["optimizer_bytes"] == 2 * 4 * (full_params - (tiny_models.V - len(used)) * 32)
    unused = torch.ones(tiny_models.V, dtype=torch.bool)
    unused[used] = False
    assert torch.equal(model.transformer.wte.weight[unused], before["transformer.wte.weight"][unused])
    assert not torch.equal(model.transformer.wte.weight[used], before["transformer.wte.weight"][used])


@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_meta_device_models_give_sizes_without_memory(output):
    """Planning a model that does not fit (bench/memory.py): no probe, no offload, exact byte counts."""
    model = tiny_models.build("llama-untied").to("meta")  # (a `torch.device("meta")` context is not honoured by
    used, _ = tiny_models.used_ids_and_batch(model)        # every transformers init path)
    handle = replace_embeddings(model, used, output=output)
    D, V, U = 32, tiny_models.V, len(used)
    assert handle.params_before - handle.params_after == 2 * (V - U) * D  # input and untied head
    assert handle.state_bytes_before - handle.state_bytes_after == 4 * 4 * 2 * (V - U) * D
    assert model.get_input_embeddings().weight.is_meta


@pytest.mark.parametrize("name", ["llama-untied", "gpt2", "t5-shared"])
def test_generate_while_frozen_is_the_original_models_generate(name):
    model = tiny_models.build(name)
    used, ids = tiny_models.used_ids_and_batch(model)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=int(used[0]))
    expected = model.generate(ids[:, :4], **kwargs)
    emits_unused = not set(expected.flatten().tolist()) <= set(used.tolist())
    replace_embeddings(model, used)  # frozen: full-vocabulary logits, config untouched
    # Greedy decoding is the original's, also where it emits an id the data never used (llama here): that id is
    # embedded with its frozen row, as full fine-tuning with the unused rows frozen would.
    assert torch.equal(model.generate(ids[:, :4], **kwargs), expected)
    assert emits_unused or name != "llama-untied"  # the fallback path really ran for one model
    unused = [i for i in range(tiny_models.V) if i not in used.tolist()][:1]
    with pytest.raises(UnusedIdError):  # outside generate(), an unscanned id is still an error
        model(input_ids=torch.tensor([unused]))


def test_generate_with_the_input_side_only_embeds_unused_ids_from_the_kept_matrix():
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=int(used[0]))
    expected = model.generate(ids[:, :4], **kwargs)
    assert not set(expected.flatten().tolist()) <= set(used.tolist())  # it does emit unused ids
    replace_embeddings(model, used, output=None)  # head untouched; full input matrix offloaded to the CPU
    assert torch.equal(model.generate(ids[:, :4], **kwargs), expected)
    restore_embeddings(model)
    assert "unused_rows" not in model.get_input_embeddings().__dict__


def test_restore_follows_the_model_to_the_device_and_dtype_it_moved_to():
    model = tiny_models.build("gpt2")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    model.to(torch.float64)  # stands in for .to("cuda"): the compact Parameters move, the kept matrix does not
    restore_embeddings(model)
    assert model.transformer.wte.weight.dtype == torch.float64
    assert model.transformer.wte.weight.device == model.transformer.h[0].attn.c_attn.weight.device
    with torch.no_grad():
        model(input_ids=ids)  # a consistent model runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: moves a CPU-compacted model to it")
@pytest.mark.parametrize("output", ["frozen", "restricted"])
def test_a_model_compacted_on_cpu_trains_after_moving_to_the_gpu(output):
    """Trainer compacts nothing but moves the model: replace on CPU, `.to("cuda")`, train with labels, restore."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used, output=output)
    model.to("cuda")
    ids = ids.cuda()
    model(input_ids=ids, labels=ids).loss.backward()  # labels remapped with the table on the GPU
    restore_embeddings(model)
    assert model.lm_head.weight.device.type == model.model.embed_tokens.weight.device.type == "cuda"
