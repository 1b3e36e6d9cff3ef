"""Tiny random Hugging Face models for breadth across architectures (V=97, D=32, 2 layers).

Each entry builds a model and says how to call it; shapes are small so the Triton interpreter stays fast.
"""

import torch

V = 97


def _kw(**extra):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    base.update(extra)
    return base


def build(name: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    builders = {
        "bert-mlm": lambda: T.BertForMaskedLM(T.BertConfig(**_kw())),
        "roberta-mlm": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**_kw(pad_token_id=1))),
        "xlm-roberta-mlm": lambda: T.XLMRobertaForMaskedLM(T.XLMRobertaConfig(**_kw(pad_token_id=1))),
        "distilbert-mlm": lambda: T.DistilBertForMaskedLM(
            T.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=37)),
        "deberta-v2-mlm": lambda: T.DebertaV2ForMaskedLM(T.DebertaV2Config(**_kw())),
        "bert-classifier": lambda: T.BertForSequenceClassification(T.BertConfig(**_kw(num_labels=3))),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2)),
        "llama-untied": lambda: T.LlamaForCausalLM(
            T.LlamaConfig(**_kw(num_key_value_heads=2, tie_word_embeddings=False))),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_kw(num_key_value_heads=2))),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_kw(num_key_value_heads=2))),
        "gemma-scaled-embedding": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_kw(num_key_value_heads=2, head_dim=16))),
        "t5-shared": lambda: T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, decoder_start_token_id=0)),
        "bart-logits-bias": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37)),
    }
    model = builders[name]().eval()
    if name == "bart-logits-bias":  # non-zero, so a bias that is not sliced or restored shows up
        model.final_logits_bias.normal_()
    return model


NAMES = [
    "bert-mlm", "roberta-mlm", "xlm-roberta-mlm", "distilbert-mlm", "deberta-v2-mlm", "bert-classifier", "gpt2",
    "llama-untied", "qwen2", "mistral", "gemma-scaled-embedding", "t5-shared", "bart-logits-bias",
]


def special_ids(model) -> set[int]:
    ids = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(cfg, name, None) if cfg is not None else None
            ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int) and 0 <= v < V)
    return ids


def used_ids_and_batch(model, num_used: int = 40, shape=(2, 9), seed: int = 1):
    """Sorted used ids (always holding the model's special ids) and a batch of ids drawn from them."""
    gen = torch.Generator().manual_seed(seed)
    used = set(torch.randperm(V, generator=gen)[:num_used].tolist()) | special_ids(model)
    used = torch.tensor(sorted(used))
    ids = used[torch.randint(0, len(used), shape, generator=gen)]
    return used, ids


def unfused_and_fused(model, output: str, **options):
    """`model` compacted twice, without and with the fused loss (the same `options` for both), both in training
    mode; returns (unfused, fused, used ids, a batch of ids)."""
    import copy

    from pema_triton import replace_embeddings

    used, ids = used_ids_and_batch(model)
    unfused = copy.deepcopy(model)
    replace_embeddings(unfused, used, output=output, **options)
    replace_embeddings(model, used, output=output, fused_loss=True, **options)
    return unfused.train(), model.train(), used, ids


def call(model, ids, **kwargs):
    """Logits (or the classifier's logits) for a batch, feeding encoder-decoders the same ids to the decoder."""
    if model.config.is_encoder_decoder:
        kwargs.setdefault("decoder_input_ids", ids)
    return model(input_ids=ids, **kwargs).logits


def token_dataset(used, num_rows: int, length: int = 12, seed: int = 3):
    """A `datasets.Dataset` of `num_rows` rows of `length` ids drawn from `used`, labels equal to the inputs."""
    import datasets

    gen = torch.Generator().manual_seed(seed)
    rows = [used[torch.randint(0, len(used), (length,), generator=gen)].tolist() for _ in range(num_rows)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def trainer_args(output_dir, **overrides):
    """TrainingArguments for a few quiet CPU steps (learning rate 1e-2, no weight decay, fixed seeds)."""
    import transformers

    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.0,
                  report_to=[], use_cpu=True, disable_tqdm=True, data_seed=0, seed=0)
    return transformers.TrainingArguments(**(kwargs | overrides))
