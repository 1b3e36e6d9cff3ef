"""Real SmolLM2-135M-Instruct on real BBC News text through TRL 1.16's trainers, the way users run them: SFT (the
example), DPO and a short GRPO with `compact_trainer`, each against the same run on the uncompacted model with the
unused rows frozen; and no tensor of N * V / 4 elements in a fused SFT step."""

import copy
import importlib.util

import pytest
import torch

from helpers import real_assets, training
from helpers.real_assets import EXAMPLES

pytestmark = pytest.mark.slow  # real SmolLM2 training steps on CPU

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from pema_triton.hf import compact_trainer  # noqa: E402


def _example():
    spec = importlib.util.spec_from_file_location("pema_example_trl_sft", EXAMPLES / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(kind, folder, **overrides):
    kwargs = dict(output_dir=str(folder), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-5,
                  logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0, bf16=False, use_cpu=True,
                  gradient_checkpointing=False, disable_tqdm=True)
    return {"dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[kind](**(kwargs | overrides))


def _logged(trainer, *keys):
    return torch.tensor([[entry[k] for k in keys] for entry in trainer.state.log_history if "loss" in entry])


def test_the_trl_sft_example_equals_its_baseline_and_holds_less_state(tmp_path):
    result = _example().main(["--steps", "3", "--articles", "8", "--json", str(tmp_path / "result.json")])
    torch.testing.assert_close(torch.tensor(result["pema"]["losses"]), torch.tensor(result["baseline"]["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert result["pema"]["optimizer_bytes"] < result["baseline"]["optimizer_bytes"]


def _sentences(num):
    texts, _ = real_assets.bbc_news(num)
    return [[s.strip() for s in text.split(".") if len(s.split()) > 4] for text in texts]


def test_dpo_on_real_text_equals_full_training_with_the_unused_rows_frozen(tmp_path):
    tokenizer, model = real_assets.smollm2()
    article = _sentences(8)
    data = datasets.Dataset.from_dict({"prompt": [a[0] for a in article], "chosen": [" " + a[1] for a in article],
                                       "rejected": [" " + a[1] for a in article[1:] + article[:1]]})
    baseline, reference_model = copy.deepcopy(model), copy.deepcopy(model)

    def dpo(policy, folder):
        return trl.DPOTrainer(model=policy.train(), ref_model=copy.deepcopy(reference_model), train_dataset=data,
                              args=_config("dpo", folder, max_length=96), processing_class=tokenizer)

    trainer = dpo(model, tmp_path / "pema")
    handle = compact_trainer(trainer)
    trainer.train()
    reference = dpo(baseline, tmp_path / "baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    keys = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen")
    torch.testing.assert_close(_logged(trainer, *keys), _logged(reference, *keys), rtol=1e-4, atol=1e-5)


def test_a_short_grpo_run_on_real_prompts_equals_its_baseline(tmp_path):
    """Completions sampled from the full-vocabulary logits reach ids the prompts never held: embed_unscanned=True
    gives them their frozen rows, and the run equals the uncompacted one with those rows frozen."""
    tokenizer, model = real_assets.smollm2()
    prompts = datasets.Dataset.from_dict({"prompt": [s[0] for s in _sentences(4)]})
    baseline, seen = copy.deepcopy(model), []

    def reward(completions, completion_ids, **_):
        seen.extend(i for row in completion_ids for i in row)
        return [float(len(set(c.split()))) for c in completions]

    def grpo(policy, folder):
        args = _config("grpo", folder, num_generations=2, max_completion_length=8, per_device_train_batch_size=4)
        return trl.GRPOTrainer(model=policy.train(), reward_funcs=reward, args=args, train_dataset=prompts,
                               processing_class=tokenizer)

    trainer = grpo(model, tmp_path / "pema")
    handle = compact_trainer(trainer, embed_unscanned=True)
    trainer.train()
    assert set(seen) - set(handle.used_ids.tolist())  # the completions reached unscanned ids
    reference = grpo(baseline, tmp_path / "baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    keys = ("loss", "reward")
    torch.testing.assert_close(_logged(trainer, *keys), _logged(reference, *keys), rtol=1e-4, atol=1e-5)


def test_a_fused_sft_step_creates_no_tensor_of_a_quarter_of_the_logits(tmp_path, monkeypatch):
    """8 x 256 tokens (N = 2,048): TRL's compute_loss and backward through the adapted head create no tensor over
    one chunk of logits (held to 16 MiB here: 4.2M fp32 logits, where [N, V] is 100.7M) and no [V, D] gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pema_triton.ops import linear_cross_entropy

    chunk_bytes = 16 * 2**20
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_BYTES", {"cpu": chunk_bytes, "cuda": chunk_bytes})

    tokenizer, model = real_assets.smollm2()
    texts, _ = real_assets.bbc_news(8)
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_length=256, report_to=[],
                           use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model.train(), args=config, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}))
    compact_trainer(trainer, callback=False, backend="torch")  # the row pass interpreted over 100M logits: minutes
    batch = next(iter(trainer.get_train_dataloader()))
    num_tokens, vocab_size = batch["input_ids"].numel(), len(tokenizer)
    assert num_tokens == 2048, "every article is longer than 256 tokens"

    class Sizes(TorchDispatchMode):
        """The largest tensor an op allocates (views and in-place results share an input's storage: skipped, as
        the refresh of the frozen head's used rows, which writes into its existing [V, D] buffer)."""

        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            shared = {a.untyped_storage().data_ptr() for a in inputs}
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in shared:
                    Sizes.largest = max(Sizes.largest, tensor.numel())
            return out

    with Sizes():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    assert chunk_bytes // 4 < num_tokens * vocab_size // 4
    assert torch.isfinite(loss) and Sizes.largest <= chunk_bytes // 4, f"{Sizes.largest:,} elements"
    assert model.get_input_embeddings().weight.grad.shape[0] < vocab_size  # [U, D]: tied, one gradient
