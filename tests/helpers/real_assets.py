"""Real pretrained models and text for integration tests (installed offline by scripts/setup.sh).

Loaded once per test session. Where an asset package is missing the test is skipped, unless
PEMA_REQUIRE_ASSETS=1 (set by .ci/run), where it fails: CI must never pass by skipping the real-model tests.
"""

import copy
import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@functools.cache
def assets():
    """examples/assets.py, the loaders the demo uses, imported from its file (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("pema_examples_assets", EXAMPLES / "assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require(loader):
    try:
        return loader()
    except ModuleNotFoundError as err:
        if os.environ.get("PEMA_REQUIRE_ASSETS") == "1":
            raise
        pytest.skip(f"real asset missing: {err}")


@functools.cache
def _bbc(num: int):
    (texts, labels), _, _ = assets().load_bbc_news(num, 0, seed=0)
    return texts, labels


def bbc_news(num: int):
    return _require(lambda: _bbc(num))


def minilm_dir():
    return _require(assets().minilm_dir)


@functools.cache
def _smollm2():
    import transformers

    folder, gguf = assets().smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.is_quantized, model.hf_quantizer = False, None  # de-quantised on load: a Trainer may fine-tune it
    return tokenizer, model.eval()


def smollm2():
    """(tokenizer, a fresh copy of SmolLM2-135M-Instruct in fp32): tied embeddings, V=49,152, D=576."""
    tokenizer, model = _require(_smollm2)
    return tokenizer, copy.deepcopy(model)
