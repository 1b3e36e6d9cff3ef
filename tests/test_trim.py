"""`save_trimmed`: a model and tokenizer cut to the kept ids, reloaded by plain transformers in a process where
pema_triton cannot be imported, tokenize the training text to the same tokens and give the same outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pema_triton as pt
from pema_triton.tokenizer_trim import TokenizerJson

from helpers.real_assets import assets, bbc_news, minilm_dir

transformers = pytest.importorskip("transformers")

LOADER = Path(__file__).resolve().parent / "helpers" / "load_trimmed.py"
OTHER_SCRIPTS = ["北京欢迎你，今天天气很好。", "😀🎉👍🏽 emoji!", "Привет, мир", "مرحبا بالعالم", "ℌ𝔢𝔩𝔩𝔬 ½ ﬁ \t\n  x",
                 "日本語のテキストです"]


def load_isolated(tmp_path, entries) -> list[dict]:
    """Runs tests/helpers/load_trimmed.py under `python -I` from `tmp_path` (outside the repository), where it
    blocks `import pema_triton`; returns its results, one per entry."""
    job, out = tmp_path / "job.json", tmp_path / "out.pt"
    job.write_text(json.dumps(entries))
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-I", str(LOADER), str(job), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def gpt2_tokenizer():
    try:
        return assets().load_tokenizer("gpt2")
    except ModuleNotFoundError as err:
        pytest.skip(f"real asset missing: {err}")


def encode(tokenizer, texts, max_length=64) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def used_of(tokenizer, rows) -> torch.Tensor:
    return torch.tensor(sorted({i for row in rows for i in row} | set(pt.special_token_ids(tokenizer))))


def weights_bytes(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def outputs_of(model, rows):
    with torch.no_grad():
        outs = []
        for row in rows:
            batch = torch.tensor([row])
            kwargs = {"decoder_input_ids": batch} if model.config.is_encoder_decoder else {}
            out = model(input_ids=batch, **kwargs)
            outs.append(out.logits[0] if hasattr(out, "logits") else out.last_hidden_state[0])
    return outs


def assert_same_tokens(kept, original_rows, trimmed_rows):
    assert len(original_rows) == len(trimmed_rows)
    for old, new in zip(original_rows, trimmed_rows):
        assert max(new) < len(kept)
        assert kept[torch.tensor(new)].tolist() == old


def test_minilm_wordpiece_reloads_with_the_same_tokens_and_hidden_states(tmp_path):
    texts, _ = bbc_news(30)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    rows = encode(tokenizer, texts, max_length=128)
    used = used_of(tokenizer, rows)
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "trimmed", used_ids=used)
    model.save_pretrained(tmp_path / "full")

    assert torch.equal(kept, torch.unique(kept)) and set(used.tolist()) <= set(kept.tolist())
    parsed = TokenizerJson(tokenizer)
    singles = {i for t, i in parsed.token_to_id.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    assert singles <= set(kept.tolist()) and len(kept) < len(used) + len(singles) + 10  # nothing else kept
    [result] = load_isolated(tmp_path, [{"dir": str(tmp_path / "trimmed"), "auto_class": "AutoModel",
                                        "texts": texts, "max_length": 128}])
    assert result["vocab_size"] == result["len_tokenizer"] == len(kept)
    assert_same_tokens(kept, rows, result["ids"])
    for ref, tri in zip(outputs_of(model, rows), result["outputs"]):
        torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    dim = model.config.hidden_size
    shrink = weights_bytes(tmp_path / "full") - weights_bytes(tmp_path / "trimmed")
    assert abs(shrink - (model.config.vocab_size - len(kept)) * dim * 4) < 4096


def test_wordpiece_unseen_words_fall_back_to_characters_not_unk(tmp_path):
    texts, _ = bbc_news(60)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    train, held_out = texts[:10], texts[10:]
    model = transformers.AutoModel.from_pretrained(minilm_dir())
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used_of(tokenizer, encode(tokenizer, train)))
    trimmed = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    unk_new, unk_old = trimmed.unk_token_id, tokenizer.unk_token_id
    for text in held_out + ["Zyxqwv glorbfnak!", "naïve café Ökonomie"]:
        old, new = tokenizer(text)["input_ids"], trimmed(text)["input_ids"]
        assert new.count(unk_new) == old.count(unk_old), text[:60]
        assert trimmed.decode(new) == tokenizer.decode(old)  # the same words, spelled with fewer pieces
    assert kept[unk_new] == unk_old


class KeepOnly:
    """A logits processor that lets `generate` pick only the kept ids."""

    def __init__(self, kept, vocab_size):
        self.blocked = torch.ones(vocab_size, dtype=torch.bool)
        self.blocked[kept] = False

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.blocked, float("-inf"))


def test_byte_level_bpe_from_a_compacted_model(tmp_path):
    texts, _ = bbc_news(12)
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, bos_token_id=50256, eos_token_id=50256)).eval()
    rows = encode(tokenizer, texts)
    handle = pt.replace_embeddings(model, used_of(tokenizer, rows))
    with torch.no_grad():  # stands in for fine-tuning: the trained rows differ from the kept full matrix
        handle.embeddings[0].weight.add_(0.5 * torch.randn_like(handle.embeddings[0].weight))
    before = {k: v.clone() for k, v in model.named_parameters()}
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t")
    assert pt.get_handle(model) is handle
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # the user's model is unchanged
    pt.restore_embeddings(model)
    model.save_pretrained(tmp_path / "full")

    [result] = load_isolated(tmp_path, [{"dir": str(tmp_path / "t"), "auto_class": "AutoModelForCausalLM",
                                        "texts": texts, "generate": 12}])
    assert_same_tokens(kept, rows, result["ids"])
    for ref, tri in zip(outputs_of(model, rows), result["outputs"]):
        torch.testing.assert_close(tri, ref[:, kept], atol=1e-5, rtol=1e-5)
    prompt = torch.tensor([rows[0][:8]])
    ref_gen = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256,
                             logits_processor=[KeepOnly(kept, len(tokenizer))])[0]
    assert kept[torch.tensor(result["generated"])].tolist() == ref_gen.tolist()
    shrink = weights_bytes(tmp_path / "full") - weights_bytes(tmp_path / "t")
    assert abs(shrink - (len(tokenizer) - len(kept)) * 32 * 4) < 4096

    trimmed = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert set(trimmed.get_vocab().values()) == set(range(len(kept)))
    for text in OTHER_SCRIPTS:
        ids = trimmed(text)["input_ids"]
        assert max(ids) < len(kept) and trimmed.decode(ids) == text
        assert tokenizer.decode(kept[torch.tensor(ids)].tolist()) == text
