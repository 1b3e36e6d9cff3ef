"""Real pretrained models and text for integration tests (installed offline by scripts/setup.sh).

Loaded once per test session. Where an asset package is missing the test is skipped, unless
PEMA_REQUIRE_ASSETS=1 (set by .ci/run), where it fails: CI must never pass by skipping the real-model tests.
"""

import copy
import functools
import os

import pytest
import torch

import examples_path  # noqa: F401

def _require(loader):
    try:
        return loader()
    except ModuleNotFoundError as err:
        if os.environ.get("PEMA_REQUIRE_ASSETS") == "1":
            raise
        pytest.skip(f"real asset missing: {err}")


@functools.cache
def _bbc(num: int):
    from assets import load_bbc_news

    (texts, labels), _, _ = load_bbc_news(num, 0, seed=0)
    return texts, labels


def bbc_news(num: int):
    return _require(lambda: _bbc(num))


def minilm_dir():
    from assets import minilm_dir as path

    return _require(path)


@functools.cache
def _smollm2():
    import transformers
    from assets import smollm2_dir

    folder, gguf = smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return tokenizer, model.eval()


def smollm2():
    """(tokenizer, a fresh copy of SmolLM2-135M-Instruct in fp32): tied embeddings, V=49,152, D=576."""
    tokenizer, model = _require(_smollm2)
    return tokenizer, copy.deepcopy(model)
