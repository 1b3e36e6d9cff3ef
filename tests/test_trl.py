"""TRL's trainers on a compacted model, the way TRL users train: build the trainer, `compact_trainer(trainer)`,
`train()`. TRL's fused LM head reads `lm_head.weight` itself; adapted, SFT and DPO give the model of full training
with every unused row frozen (losses, metrics and weights to fp32 round-off); unadapted, it is refused before a
step. The real SmolLM2 runs are in tests/test_trl_real.py (slow)."""

import copy

import pytest
import torch

from helpers import tiny_models, tiny_trl, training
from helpers.state import assert_state, snapshot
from pema_triton import CompactWeightError, PemaError, UnsupportedModuleError, get_handle, replace_embeddings

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
from pema_triton.hf import compact_trainer  # noqa: E402  (after the skips: imports transformers)

METRICS = ("loss", "entropy", "mean_token_accuracy")


# Online trainers: their trainer class and config options (RLOO's reference model off: beta = 0, as GRPO's default).
ONLINE = {"grpo": ("GRPOTrainer", {}), "rloo": ("RLOOTrainer", {"beta": 0.0})}


def _online(kind, model, folder, reward):
    import datasets

    trainer_class, options = ONLINE[kind]
    prompts = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9", "t10 t11 t5", "t6"] * 2})
    args = tiny_trl.config(kind, folder, num_generations=2, max_completion_length=6, **options)
    return getattr(trl, trainer_class)(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                                       processing_class=tiny_trl.tokenizer())


def _sft(model, tmp_path, data="text", **overrides):
    dataset = tiny_trl.sft_data() if data == "text" else tiny_trl.prompt_completion_data()
    return trl.SFTTrainer(model=model, args=tiny_trl.config("sft", tmp_path, **overrides), train_dataset=dataset,
                          processing_class=tiny_trl.tokenizer())


SFT_CASES = {  # SFTConfig options, compact_trainer options, the dataset
    "plain": ({}, {}, "text"),
    "fused": ({}, {"fused_loss": True}, "text"),
    "packing": ({"packing": True, "max_length": 24}, {}, "text"),  # two 11-token rows a sequence, padding-free
    "padding-free": ({"padding_free": True, "max_length": None}, {}, "text"),
    "completion-only": ({"completion_only_loss": True}, {}, "prompt-completion"),
}


@pytest.mark.parametrize("case", SFT_CASES)
def test_sft_equals_full_training_with_the_unused_rows_frozen(tmp_path, case):
    config, options, data = SFT_CASES[case]
    model = tiny_trl.model()
    baseline = copy.deepcopy(model)
    trainer = _sft(model, tmp_path / "pema", data=data, **config)
    handle = compact_trainer(trainer, **options)
    assert handle.compaction.num_used < tiny_models.V and 2 in handle.used_ids.tolist()  # TRL's appended EOS
    trainer.train()  # PemaCallback restores the model at the end
    reference = _sft(baseline, tmp_path / "baseline", data=data, **config)
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    assert get_handle(model) is None
    tiny_trl.assert_same_run(trainer, reference, METRICS, model, baseline)


def test_sft_restricted_scores_and_ranks_labels_over_the_used_ids(tmp_path):
    """`restricted`: log-probs are a softmax over the U used ids, and top-1 (TRL's mean_token_accuracy) compares
    the argmax over them with the label in original ids, not a compact column with an original id."""
    model = tiny_trl.model()
    plain = copy.deepcopy(model)
    trainer = _sft(model, tmp_path, max_steps=1)
    handle = compact_trainer(trainer, output="restricted", callback=False)
    used = handle.used_ids
    ids = used[torch.arange(12) % len(used)].reshape(2, 6)
    with torch.no_grad():
        logits = plain(input_ids=ids).logits[:, :-1, used]
    labels = ids.clone()
    labels[:, 1::2] = used[logits.argmax(-1)[:, ::2]]  # every other label is the top-1 over the used ids
    labels[:, :1] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    targets, mask = labels[:, 1:], labels[:, 1:] != -100
    columns = torch.searchsorted(used, targets.clamp(min=0))
    want = logits.log_softmax(-1).gather(-1, columns[..., None]).squeeze(-1)
    torch.testing.assert_close(out.log_probs[mask], want[mask], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.is_top1[mask], (used[logits.argmax(-1)] == targets)[mask])
    assert out.is_top1[:, ::2].all()  # the labels set to the top-1 are counted as such
    trainer.train()
    assert all(0.0 <= acc <= 1.0 for (acc,) in tiny_trl.logged(trainer, "mean_token_accuracy"))


def test_a_model_compacted_before_the_trainer_is_refused_before_any_step(tmp_path):
    """What a user who compacts first meets: TRL's fused head would multiply by the [U, D] rows (SFT's loss on
    real SmolLM2 was 17.08 instead of 3.63). The first forward raises, naming compact_trainer; nothing stepped."""
    model = tiny_trl.model()
    used = torch.tensor(sorted(set(range(4)) | set(range(4, 60))))
    replace_embeddings(model, used)
    before = snapshot(model)
    with pytest.raises(CompactWeightError, match="compact_trainer"):
        _sft(model, tmp_path).train()
    assert_state(model, before)


@pytest.mark.parametrize("reference, fused_loss", [("explicit", False), ("from-path", True)])
def test_dpo_equals_full_training_with_the_unused_rows_frozen(tmp_path, reference, fused_loss):
    """The reference model stays uncompacted, so its log-probs are exact: passed explicitly, or (ref_model=None
    without PEFT) loaded by TRL from the policy's own path."""
    model = tiny_trl.model()
    model.save_pretrained(tmp_path / "policy")
    model.config._name_or_path = str(tmp_path / "policy")
    baseline = copy.deepcopy(model)

    def dpo(policy, folder):
        ref = copy.deepcopy(policy) if reference == "explicit" else None
        return trl.DPOTrainer(model=policy, ref_model=ref, train_dataset=tiny_trl.dpo_data(),
                              args=tiny_trl.config("dpo", folder), processing_class=tiny_trl.tokenizer())

    trainer = dpo(model, tmp_path / "pema")
    assert get_handle(trainer.ref_model) is None and trainer.ref_model is not model
    handle = compact_trainer(trainer, fused_loss=fused_loss)
    trainer.train()
    reference_run = dpo(baseline, tmp_path / "baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference_run.train()
    keys = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen")
    tiny_trl.assert_same_run(trainer, reference_run, keys, model, baseline)


def test_misuses_of_compact_trainer_are_refused_with_the_model_untouched(tmp_path):
    model = tiny_trl.model()
    dpo = trl.DPOTrainer(model=model, ref_model=tiny_trl.model(), train_dataset=tiny_trl.dpo_data(),
                         args=tiny_trl.config("dpo", tmp_path / "dpo"), processing_class=tiny_trl.tokenizer())
    before = snapshot(model)
    with pytest.raises(PemaError, match=r"log\(Z_V / Z_U\)"):  # restricted policy vs full-vocabulary reference
        compact_trainer(dpo, output="restricted")
    sft = _sft(model, tmp_path / "sft")
    sft.create_optimizer()
    with pytest.raises(PemaError, match="optimizer exists already"):
        compact_trainer(sft)
    grpo = _online("grpo", tiny_trl.model(), tmp_path / "grpo", lambda completions, **_: [0.0] * len(completions))
    with pytest.raises(PemaError, match="embed_unscanned=True .* or output='restricted'"):
        compact_trainer(grpo)  # frozen: completions would hold unscanned ids; the user must choose
    no_ids = _sft(tiny_trl.model(), tmp_path / "no_ids")
    no_ids.train_dataset = no_ids.train_dataset.select_columns(["text"])
    with pytest.raises(PemaError, match="hold no token-id columns"):
        compact_trainer(no_ids)
    assert get_handle(model) is None and get_handle(grpo.model) is None and get_handle(no_ids.model) is None
    assert_state(model, before)


@pytest.mark.parametrize("kind", ONLINE)
def test_online_training_with_unscanned_completion_ids_equals_full_training_with_those_rows_frozen(tmp_path, kind):
    """GRPO and RLOO: the scan sees the prompts as the trainer tokenizes them; the completions the model samples
    hold ids nobody scanned, which `embed_unscanned=True` embeds and scores with their frozen rows. The same
    samples, rewards, losses and weights as the uncompacted model trained with every row outside the scanned ids
    frozen."""
    seen = []

    def reward(completions, completion_ids, **_):
        seen.extend(i for row in completion_ids for i in row)
        return [len(c) / 10 for c in completions]

    model = tiny_trl.model()
    baseline = copy.deepcopy(model)
    trainer = _online(kind, model, tmp_path / "pema", reward)
    handle = compact_trainer(trainer, embed_unscanned=True)
    assert set(handle.used_ids.tolist()) == {0, 1, 2, 3, *range(5, 12)}  # the prompts' ids and the specials
    trainer.train()
    assert set(seen) - set(handle.used_ids.tolist())  # completions did reach unscanned ids
    reference = _online(kind, baseline, tmp_path / "baseline", reward)
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    keys = ("loss", "reward", "entropy")
    tiny_trl.assert_same_run(trainer, reference, keys, model, baseline)


def test_dpo_under_peft_takes_its_reference_from_the_original_rows(tmp_path):
    """`ref_model=None` under PEFT: the reference is the policy with its adapter disabled. The compact rows train
    in place (no adapter holds them), so within `disable_adapter()` they read the original rows: the same run as
    PEFT training the full matrices as modules_to_save copies (whose originals the reference uses), unused rows
    frozen. Without that, step 2's loss was 0.69314 instead of 0.69272; and the reference pass, run between the
    policy's forward and backward, must leave the frozen head's buffer holding the trained rows again."""
    peft = pytest.importorskip("peft")
    model = tiny_trl.model()
    baseline = copy.deepcopy(model)

    def dpo(policy, folder, **lora):  # 4 steps: a reference pass that left its rows behind showed from step 3
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **lora)
        return trl.DPOTrainer(model=policy, args=tiny_trl.config("dpo", folder, max_steps=4),
                              train_dataset=tiny_trl.dpo_data(16), processing_class=tiny_trl.tokenizer(),
                              peft_config=config)

    trainer = dpo(model, tmp_path / "pema")
    handle = compact_trainer(trainer)
    trainer.train()
    reference = dpo(baseline, tmp_path / "baseline", modules_to_save=["embed_tokens", "lm_head"])
    training.freeze_rows_outside(reference.model.get_base_model(), handle.used_ids)
    reference.train()
    keys = ("loss", "rewards/chosen", "rewards/rejected")
    torch.testing.assert_close(torch.tensor(tiny_trl.logged(trainer, *keys)),
                               torch.tensor(tiny_trl.logged(reference, *keys)), rtol=1e-5, atol=1e-6)
    # The adapters the two runs trained (the rewards, differences of log-prob sums near -23, hide 1e-7 errors).
    want = {n: p for n, p in reference.model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys() and got
    for name, param in got.items():
        torch.testing.assert_close(param, want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_another_packages_forward_reading_the_head_is_refused(tmp_path):
    """Liger's and Unsloth's fused cross-entropy replace the model's forward with one that multiplies by
    lm_head.weight; on a compacted model it raises before a loss exists (a forward of that package's module here,
    as installing it patches one in)."""
    import types

    model = tiny_trl.model()
    used, ids = tiny_models.used_ids_and_batch(model)
    replace_embeddings(model, used)
    namespace = {"__name__": "liger_kernel.transformers.model.llama"}
    exec("def lce_forward(self, input_ids=None, labels=None, **kwargs):\n    return self.lm_head.weight", namespace)
    model.forward = types.MethodType(namespace["lce_forward"], model)
    with pytest.raises(CompactWeightError, match="comes from 'liger_kernel'"):
        model(input_ids=ids, labels=ids)


def test_a_plain_trainer_is_compacted_to_its_datasets_ids(tmp_path):
    import transformers

    model = tiny_trl.model()
    used, _ = tiny_models.used_ids_and_batch(model)
    data = tiny_models.token_dataset(used, 8)
    trainer = transformers.Trainer(model=model, args=tiny_models.trainer_args(tmp_path, max_steps=2),
                                   train_dataset=data, eval_dataset={"a": data.select(range(4))})
    handle = compact_trainer(trainer)
    in_data = {i for row in data["input_ids"] for i in row}
    assert set(handle.used_ids.tolist()) == in_data  # no tokenizer: no special ids beyond the data's
    trainer.train()
    assert get_handle(model) is None  # PemaCallback restored it


def test_refusals_for_a_biased_head_and_a_peft_reference_adapter(tmp_path):
    """TRL's fused head adds lm_head.bias, which the compact head does not (refused, model untouched); a
    PeftModel given to DPOTrainer keeps its reference as the adapter 'ref', which would see the trained rows."""
    peft = pytest.importorskip("peft")
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    phi = transformers.PhiForCausalLM(transformers.PhiConfig(vocab_size=tiny_models.V, hidden_size=32,
                                                             intermediate_size=37, num_hidden_layers=1,
                                                             num_attention_heads=2))
    add_fused_lm_head(phi)
    before = snapshot(phi)
    with pytest.raises(UnsupportedModuleError, match="LM head has a bias"):
        replace_embeddings(phi, torch.arange(60))
    assert_state(phi, before) and get_handle(phi) is None
    policy = peft.get_peft_model(tiny_trl.model(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = trl.DPOTrainer(model=policy, args=tiny_trl.config("dpo", tmp_path), train_dataset=tiny_trl.dpo_data(),
                             processing_class=tiny_trl.tokenizer())
    with pytest.raises(PemaError, match="reference as the PEFT adapter 'ref'"):
        compact_trainer(trainer)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_adapted_head_runs_the_backend_the_model_was_compacted_with(tmp_path, monkeypatch, backend):
    """compact_trainer(..., backend=) reaches the log-probs' row pass, as it reaches the lookups."""
    from pema_triton.ops import dispatch, reference

    model = tiny_trl.model()
    trainer = _sft(model, tmp_path / "pema")
    compact_trainer(trainer, callback=False, backend=backend)
    ran = []
    for name, module in (("triton", dispatch.kernels_or_reference(True)), ("torch", reference)):
        row_pass = module.log_prob_rows
        monkeypatch.setattr(module, "log_prob_rows",
                            lambda *a, _name=name, _run=row_pass, **k: ran.append(_name) or _run(*a, **k))
    trainer.compute_loss(model, next(iter(trainer.get_train_dataloader())))
    assert ran and set(ran) == {dispatch.resolve_backend(backend, torch.device("cpu"))}


def test_generation_sees_the_forwards_signature(tmp_path):
    """generate() reads the forward's parameters to build an attention mask from the padding: the adapter shows
    TRL's (the model's own), so a left-padded batch without a mask decodes as the uncompacted model does."""
    import inspect

    model = tiny_trl.model().eval()
    plain = copy.deepcopy(model)
    compact_trainer(_sft(model, tmp_path / "pema"), callback=False)
    _sft(plain, tmp_path / "plain")  # TRL's forward on the uncompacted copy
    assert "attention_mask" in inspect.signature(model.forward).parameters
    ids = torch.tensor([[1, 1, 5, 6, 7], [8, 9, 10, 11, 5]])  # 1 is the pad id, on the left
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.equal(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_kto_equals_full_training_with_the_unused_rows_frozen(tmp_path):
    """KTO: unpaired prompt / completion / label rows, a reference model of its own (uncompacted, exact)."""
    model = tiny_trl.model()
    baseline = copy.deepcopy(model)

    def kto(policy, folder):
        return trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), train_dataset=tiny_trl.kto_data(),
                              args=tiny_trl.config("kto", folder), processing_class=tiny_trl.tokenizer())

    trainer = kto(model, tmp_path / "pema")
    handle = compact_trainer(trainer)
    trainer.train()
    reference = kto(baseline, tmp_path / "baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    keys = ("loss", "kl")
    tiny_trl.assert_same_run(trainer, reference, keys, model, baseline)
