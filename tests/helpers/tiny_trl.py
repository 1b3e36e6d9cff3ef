"""TRL trainers on the tiny models: a word-level tokenizer over their V = 97 ids ("<unk>" 0, "<pad>" 1, "<eos>" 2,
"<bos>" 3, then "t4" ... "t96"), SFT and DPO data as text, quiet fp32 configs (the baseline PEMA must equal is
helpers.training.freeze_rows_outside)."""

import torch

from helpers import tiny_models

SPECIAL = {"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(SPECIAL.values())} | {f"t{i}": i for i in range(4, tiny_models.V)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, **SPECIAL)


def model(name: str = "llama-untied"):
    built = tiny_models.build(name).train()
    built.config.pad_token_id, built.config.eos_token_id, built.config.bos_token_id = 1, 2, 3
    built.generation_config.pad_token_id = 1
    return built


def _words(gen, n: int, high: int) -> str:
    return " ".join(f"t{int(i)}" for i in torch.randint(4, high, (n,), generator=gen))


def sft_data(rows: int = 8, high: int = 60):
    """Text rows of ids 4 .. high - 1 (TRL tokenizes them and appends EOS)."""
    import datasets

    gen = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"text": [_words(gen, 10, high) for _ in range(rows)]})


def prompt_completion_data(rows: int = 8):
    import datasets

    gen = torch.Generator().manual_seed(2)
    return datasets.Dataset.from_dict({"prompt": [_words(gen, 5, 60) for _ in range(rows)],
                                       "completion": [" " + _words(gen, 4, 60) for _ in range(rows)]})


def dpo_data(rows: int = 8):
    import datasets

    gen = torch.Generator().manual_seed(1)
    return datasets.Dataset.from_dict({
        "prompt": [_words(gen, 5, 60) for _ in range(rows)],
        "chosen": [" " + _words(gen, 4, 60) for _ in range(rows)],
        "rejected": [" " + _words(gen, 4, 60) for _ in range(rows)],
    })


def kto_data(rows: int = 8):
    """Unpaired preferences: a prompt, a completion and whether it is desirable."""
    import datasets

    gen = torch.Generator().manual_seed(3)
    return datasets.Dataset.from_dict({"prompt": [_words(gen, 5, 60) for _ in range(rows)],
                                       "completion": [" " + _words(gen, 4, 60) for _ in range(rows)],
                                       "label": [i % 2 == 0 for i in range(rows)]})


def config(kind: str, output_dir, **overrides):
    """SFTConfig / DPOConfig for two quiet fp32 steps; SGD, so equal gradients give equal weights (Adam's first
    step divides each by its own magnitude, turning round-off in a near-zero gradient into +-lr)."""
    import trl

    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                  report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, data_seed=0,
                  save_strategy="no", bf16=False, optim="sgd")
    configs = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig, "kto": trl.KTOConfig,
               "rloo": trl.RLOOConfig}
    return configs[kind](**(kwargs | overrides))


def logged(trainer, *keys) -> list[tuple]:
    return [tuple(entry[k] for k in keys) for entry in trainer.state.log_history if "loss" in entry]


def assert_same_run(trainer, reference, keys, model=None, baseline=None) -> None:
    """The `keys` the two trainers logged and, where given, the two models' weights, equal to fp32 round-off.

    Weights to 1e-5 absolute: the two heads sum the same gradients in other orders (pema's made in the forward,
    TRL's recomputed), and Adam at lr 1e-2 turns 1e-7 of gradient round-off on a near-zero element into up to 7.9e-6
    of weight after 3 steps (test_embedding_lr, measured); a row trained that should not be is off by ~lr."""
    torch.testing.assert_close(torch.tensor(logged(trainer, *keys)), torch.tensor(logged(reference, *keys)),
                               rtol=1e-5, atol=1e-6)
    for name, tensor in ({} if baseline is None else baseline.state_dict()).items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
