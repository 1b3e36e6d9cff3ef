"""PEFT beside PEMA: LoRA on attention with compacted embeddings, PEFT's `modules_to_save` copies compacted inside
their wrappers, and what PEFT does after `replace_embeddings` refused or warned about (:mod:`pema_triton.wrappers`).

The order that works for everything: `get_peft_model` first, then `replace_embeddings(peft_model, used_ids)`. The
other order works for plain LoRA under the Trainer (PemaCallback makes the rows PEFT froze trainable again).
Tiny models for breadth; real SmolLM2 (tied) for the promise: LoRA + compacted embeddings train exactly as the
same PEFT run without PEMA with the unused rows frozen.
"""

import warnings

import pytest
import torch
from torch import nn

from helpers import real_assets, tiny_models
from helpers.devices import DEVICE, ON_GPU
from helpers.state import assert_state, snapshot
from helpers.training import assert_same_training, train
from pema_triton import (
    Compaction,
    PemaWarning,
    UnsupportedModuleError,
    get_handle,
    replace_embeddings,
    restore_embeddings,
    scan_vocabulary,
    special_token_ids,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

D = 32  # tiny_models hidden size
ATTENTION = {"llama-untied": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5-shared": ["q", "v"]}


def _peft(model, arch, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own advice on tied layers in modules_to_save
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=ATTENTION[arch], r=2, **config))


def _sgd_step(model, ids):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def _unused(used):
    unused = torch.ones(tiny_models.V, dtype=torch.bool)
    unused[used] = False
    return unused


@pytest.mark.parametrize("arch", ["llama-untied", "gpt2"])
def test_lora_then_pema_trains_the_compact_rows_without_setting_requires_grad(arch):
    model = tiny_models.build(arch)
    used, ids = tiny_models.used_ids_and_batch(model)
    pretrained = model.get_input_embeddings().weight.detach().clone()
    peft_model = _peft(model, arch)  # freezes every base weight, the embeddings too
    handle = replace_embeddings(peft_model, used)
    assert get_handle(peft_model) is handle and get_handle(model) is handle and handle.model is model
    compact = model.get_input_embeddings().weight
    assert compact.requires_grad and compact.shape[0] == used.numel()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    _sgd_step(peft_model, ids)
    assert all(p.abs().sum() > 0 for p in lora_b)  # the adapters train (lora_B starts at zero)
    assert restore_embeddings(peft_model) is peft_model
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[_unused(used)], pretrained[_unused(used)])
    assert not torch.equal(weight[used], pretrained[used])


def test_modules_to_save_trains_a_compact_copy_and_saves_the_full_vocabulary(tmp_path):
    """modules_to_save would train full [V, D] copies of embedding and head; compacted, the copies are [U, D]. The
    adapter saved mid-training, after restore, and merge_and_unload all hold full-vocabulary matrices."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    peft_model = _peft(model, "llama-untied", modules_to_save=["embed_tokens", "lm_head"])
    wrapper = model.model.embed_tokens
    original = wrapper.original_module.weight.detach().clone()
    handle = replace_embeddings(peft_model, used)
    copy_ = wrapper.modules_to_save["default"]
    assert handle.embeddings == [copy_] and copy_.weight.shape == (used.numel(), D)
    assert wrapper.original_module.weight.shape == (tiny_models.V, D)  # frozen, left alone
    assert handle.state_bytes_after < handle.state_bytes_before
    _sgd_step(peft_model, ids)

    peft_model.save_pretrained(tmp_path / "mid")  # while compacted
    restore_embeddings(peft_model)
    trained = copy_.weight.detach().clone()
    assert type(copy_) is nn.Embedding and trained.shape == (tiny_models.V, D)
    assert torch.equal(trained[_unused(used)], original[_unused(used)])
    assert not torch.equal(trained[used], original[used])
    assert torch.equal(wrapper.original_module.weight, original)

    peft_model.eval()
    expected = peft_model(input_ids=ids).logits
    for adapter in ("mid", "end"):
        if adapter == "end":
            peft_model.save_pretrained(tmp_path / adapter)
        loaded = peft.PeftModel.from_pretrained(tiny_models.build("llama-untied"), tmp_path / adapter).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    merged = peft_model.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding and torch.equal(merged.model.embed_tokens.weight, trained)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_an_adapter_saved_and_reloaded_keeps_the_trained_base_rows(modules_to_save, tmp_path):
    """Under plain LoRA (or modules_to_save naming the head only) the base embedding's used rows train, outside
    any adapter: PEFT's save_pretrained would leave them out, and a reload onto a fresh base lost the training.
    The PeftModel's save_pretrained now saves the embedding layers by default, while compacted and after restore."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    peft_model = _peft(model, "llama-untied", modules_to_save=modules_to_save)
    replace_embeddings(peft_model, used)
    _sgd_step(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "mid")  # a Trainer checkpoint goes this way
    restore_embeddings(peft_model)
    peft_model.save_pretrained(tmp_path / "end")
    # A checkpoint of the PeftModel records the rows its optimizer state is for, as one of a plain model does.
    assert torch.equal(Compaction.load(tmp_path / "mid").used_ids, used)
    assert not (tmp_path / "end" / "pema_compaction.json").exists()
    expected = peft_model.eval()(input_ids=ids).logits
    for adapter in ("mid", "end"):
        loaded = peft.PeftModel.from_pretrained(tiny_models.build("llama-untied"), tmp_path / adapter).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_modules_to_save_on_a_tied_model_keeps_the_copies_tied():
    """ensure_weight_tying: PEFT ties the head's copy to the embedding's; compacted, they share one [U, D] matrix."""
    model = tiny_models.build("gpt2")
    used, ids = tiny_models.used_ids_and_batch(model)
    peft_model = _peft(model, "gpt2", modules_to_save=["wte", "lm_head"], ensure_weight_tying=True)
    handle = replace_embeddings(peft_model, used)
    embedding, head = handle.embeddings[0], handle.heads[0]
    assert handle.tied and head.weight is embedding.weight and embedding.weight.shape[0] == used.numel()
    _sgd_step(peft_model, ids)
    restore_embeddings(peft_model)
    assert head.weight is embedding.weight and embedding.weight.shape[0] == tiny_models.V


@pytest.mark.parametrize("arch, one_side, output", [("gpt2", ["wte"], "frozen"), ("gpt2", ["lm_head"], "frozen"),
                                                    ("gpt2", ["wte"], None), ("t5-shared", ["shared"], None)])
def test_modules_to_save_naming_one_side_of_a_tied_matrix_is_refused(arch, one_side, output):
    """PEFT would train a copy of one side while the other keeps the original matrix (untying them); compacted, the
    frozen original would share the kept matrix. Refused before anything changes, saying what to name."""
    model = tiny_models.build(arch)
    used, _ = tiny_models.used_ids_and_batch(model)
    peft_model = _peft(model, arch, modules_to_save=one_side)
    before = snapshot(peft_model)
    with pytest.raises(UnsupportedModuleError, match="one side of a tied matrix.*ensure_weight_tying=True"):
        replace_embeddings(peft_model, used, output=output)
    assert get_handle(peft_model) is None
    assert_state(peft_model, before)


@pytest.mark.parametrize("config, output, match", [
    ({"modules_to_save": ["lm_head"]}, "restricted", "disable_adapter"),  # DPO's reference pass: V columns
    ({"target_modules": ["q_proj", "embed_tokens"]}, "frozen", "tuner layer"),
])
def test_peft_setups_the_compaction_cannot_serve_are_refused_with_the_model_untouched(config, output, match):
    model = tiny_models.build("llama-untied")
    used, _ = tiny_models.used_ids_and_batch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**{"target_modules": ["q_proj"], "r": 2, **config}))
    before = {k: (v.clone(), v.requires_grad) for k, v in peft_model.named_parameters()}
    with pytest.raises(UnsupportedModuleError, match=match):
        replace_embeddings(peft_model, used, output=output)
    assert get_handle(peft_model) is None
    after = {k: (v, v.requires_grad) for k, v in peft_model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(v, before[k][0]) and grad == before[k][1] for k, (v, grad) in after.items())


def test_trainable_token_indices_are_refused_with_the_model_untouched():
    """PEFT's trainable tokens train a delta of chosen rows of the full matrix: the compaction's job, refused."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    peft_model = _peft(model, "llama-untied", trainable_token_indices=[int(used[3])])
    before = snapshot(peft_model)
    with pytest.raises(UnsupportedModuleError, match=rf"trainable_ids=\[{int(used[3])}\]"):
        replace_embeddings(peft_model, used)
    assert get_handle(peft_model) is None
    assert_state(peft_model, before)


def test_the_suggested_trainable_ids_train_those_rows_beside_lora():
    """What the refusal above suggests: LoRA without trainable tokens, then trainable_ids: the named rows and the
    adapters train, every other row (used or not) stays as it was."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    pretrained = model.get_input_embeddings().weight.detach().clone()
    peft_model = _peft(model, "llama-untied")
    handle = replace_embeddings(peft_model, used, trainable_ids=used[3:4])
    rows = [handle.embeddings[0].weight, handle.heads[0].weight]  # untied: input and head rows, one each
    assert [(p.shape[0], p.requires_grad) for p in rows] == [(1, True), (1, True)]
    _sgd_step(peft_model, ids)
    restore_embeddings(peft_model)
    changed = (model.get_input_embeddings().weight.detach() != pretrained).any(1).nonzero().flatten()
    assert changed.tolist() == [int(used[3])] and torch.equal(handle.trainable_ids, used[3:4])


@pytest.mark.parametrize("config", [{"trainable_token_indices": [3]}, {"modules_to_save": ["embed_tokens"]}])
def test_peft_wrappers_added_after_replace_are_refused_and_restore_still_merges(config):
    """After replace_embeddings, trainable tokens would look original ids up in the [U, D] rows and modules_to_save
    would train a copy restore never merges: the first forward raises, saying which order works."""
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    pretrained = model.get_input_embeddings().weight.detach().clone()
    replace_embeddings(model, used)
    config = {k: [int(used[v[0]])] if k == "trainable_token_indices" else v for k, v in config.items()}
    peft_model = _peft(model, "llama-untied", **config)
    with pytest.raises(UnsupportedModuleError, match=r"then replace_embeddings\(peft_model"):
        peft_model(input_ids=ids, labels=ids)
    restore_embeddings(peft_model)
    embedding = model.get_input_embeddings()
    base = getattr(embedding, "original_module", None) or embedding.token_adapter.base_layer
    assert torch.equal(base.weight, pretrained)


def test_switching_to_another_adapters_copy_is_refused_and_switching_back_runs():
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    peft_model = _peft(model, "llama-untied", modules_to_save=["embed_tokens"])
    replace_embeddings(peft_model, used)
    peft_model.add_adapter("other", peft.LoraConfig(target_modules=ATTENTION["llama-untied"], r=2,
                                                    modules_to_save=["embed_tokens"]))
    peft_model.set_adapter("other")
    with pytest.raises(UnsupportedModuleError, match="another adapter's copy was compacted"):
        peft_model(input_ids=ids)
    peft_model.set_adapter("default")
    peft_model(input_ids=ids)
    restore_embeddings(peft_model)


def test_lora_after_replace_warns_that_peft_froze_the_rows():
    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    peft_model = _peft(model, "llama-untied").train()
    with pytest.warns(PemaWarning, match="froze them with every base weight"):
        peft_model(input_ids=ids, labels=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PemaWarning)  # once
        peft_model(input_ids=ids, labels=ids)
    assert get_handle(peft_model) is get_handle(model)
    restore_embeddings(peft_model)


def test_pema_then_lora_under_the_trainer_trains_the_rows_peft_froze(tmp_path):
    """The other order with the Trainer: PemaCallback makes the rows PEFT froze trainable before the optimizer is
    built, so they train and merge back, and the saved adapter carries them."""
    from pema_triton.hf import PemaCallback

    model = tiny_models.build("llama-untied")
    used, ids = tiny_models.used_ids_and_batch(model)
    pretrained = model.get_input_embeddings().weight.detach().clone()
    replace_embeddings(model, used)
    peft_model = _peft(model, "llama-untied")
    assert not model.get_input_embeddings().weight.requires_grad  # PEFT froze the compact rows
    trainer = transformers.Trainer(model=peft_model, args=tiny_models.trainer_args(tmp_path, max_steps=2),
                                   train_dataset=tiny_models.token_dataset(used, 8), callbacks=[PemaCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PemaWarning)  # nothing left frozen to warn about
        trainer.train()
    assert get_handle(peft_model) is None  # the callback restored it
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[_unused(used)], pretrained[_unused(used)])
    assert not torch.equal(weight[used], pretrained[used])
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_models.build("llama-untied"), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_a_trainer_run_of_a_compacted_peft_model_resumes_bit_for_bit(tmp_path):
    """The Trainer checkpoints a PeftModel through its save_pretrained: LoRA weights, the base embedding layers
    (their used rows train), pema_compaction.json and the [U, D] optimizer state. Resumed at step 2 of 4 into a
    freshly compacted PeftModel, the run ends where the uninterrupted one does."""
    from pema_triton.hf import PemaCallback

    used, _ = tiny_models.used_ids_and_batch(tiny_models.build("llama-untied"))
    data = tiny_models.token_dataset(used, 16)

    def run(resume_from=None):
        torch.manual_seed(0)  # the same LoRA initialisation
        peft_model = _peft(tiny_models.build("llama-untied"), "llama-untied")
        replace_embeddings(peft_model, used)
        args = tiny_models.trainer_args(tmp_path, max_steps=4, save_steps=2, save_strategy="steps")
        transformers.Trainer(model=peft_model, args=args, train_dataset=data,
                             callbacks=[PemaCallback()]).train(resume_from_checkpoint=resume_from)
        return peft_model.state_dict()

    uninterrupted = run()
    assert torch.equal(Compaction.load(tmp_path / "checkpoint-2").used_ids, used)
    resumed = run(resume_from=str(tmp_path / "checkpoint-2"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(v, uninterrupted[k]) for k, v in resumed.items())


@pytest.mark.slow  # real SmolLM2-135M
def test_smollm2_lora_with_compacted_tied_embeddings_equals_its_frozen_baseline():
    """Real SmolLM2 (tied), LoRA on attention: PEMA `frozen` trains exactly as the same PEFT run without PEMA with
    the embedding trainable and its unused rows frozen by a gradient hook. Bit for bit on CPU."""
    tokenizer, base_model = real_assets.smollm2()
    texts, _ = real_assets.bbc_news(6)
    ids = tokenizer(texts, truncation=True, max_length=24, return_tensors="pt")["input_ids"]
    batches = [ids[i : i + 2] for i in range(0, 6, 2)]
    used = scan_vocabulary(batches, len(tokenizer), keep=special_token_ids(tokenizer))
    in_used = torch.zeros(len(tokenizer), dtype=torch.bool, device=DEVICE)
    in_used[used] = True
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.0)

    def run(pema):
        torch.manual_seed(0)  # the same LoRA initialisation
        model = peft.get_peft_model((base_model if pema else real_assets.smollm2()[1]).train().to(DEVICE), config)
        if pema:
            replace_embeddings(model, used, output="frozen", tokenizer=tokenizer)
        else:  # the baseline: the embedding trained by hand, its unused rows frozen
            weight = model.get_input_embeddings().weight.requires_grad_(True)
            weight.register_hook(lambda g: g * in_used[:, None])
        losses = train(model, batches, lambda m, b: m(input_ids=b, labels=b).loss)
        if pema:
            restore_embeddings(model)
        return losses, model

    pretrained = base_model.get_input_embeddings().weight.detach().clone()
    base_losses, baseline = run(pema=False)
    pema_losses, pema = run(pema=True)
    assert pema.get_output_embeddings().weight is pema.get_input_embeddings().weight  # still tied
    assert_same_training(pema_losses, base_losses, pema.state_dict(), baseline.state_dict(), exact=not ON_GPU,
                         embedding_key="base_model.model.model.embed_tokens.weight")
    weight = pema.get_input_embeddings().weight.detach()
    assert torch.equal(weight[~in_used], pretrained[~in_used])
    assert not torch.equal(weight[in_used], pretrained[in_used])
    merged, merged_baseline = pema.merge_and_unload(), baseline.merge_and_unload()
    assert all(torch.equal(v, merged_baseline.state_dict()[k]) or ON_GPU for k, v in merged.state_dict().items())
