"""`save_trimmed(min_count=, max_vocab=)` and `pema-triton trim`: the kept set follows the scan's counts, every text
still round-trips through the trimmed tokenizer, and bad options are refused before anything is written."""

import json

import pytest
import torch
from test_trim import OTHER_SCRIPTS, encode, gpt2_tokenizer

import pema_triton as pt
from helpers.real_assets import bbc_news
from pema_triton import cli
from pema_triton.errors import UsedIdsError, VocabularySizeError
from pema_triton.tokenizer_trim import TokenizerJson, kept_token_ids

transformers = pytest.importorskip("transformers")


def _tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, bos_token_id=50256, eos_token_id=50256)).eval()


@pytest.fixture(scope="module")
def case():
    """(tokenizer, model, texts, used ids, [V] counts) of five BBC News articles under GPT-2's tokenizer."""
    tokenizer = gpt2_tokenizer()
    texts, _ = bbc_news(5)
    scan = pt.VocabularyScan(len(tokenizer), count=True)
    for row in encode(tokenizer, texts, max_length=512):
        scan.update(torch.tensor(row))
    return tokenizer, _tiny_gpt2(tokenizer), texts, scan.used_ids(), scan.counts


def _round_trips(directory, texts):
    trimmed = transformers.AutoTokenizer.from_pretrained(directory)
    for text in [*texts, *OTHER_SCRIPTS]:
        ids = trimmed(text)["input_ids"]
        assert max(ids) < len(trimmed) and trimmed.decode(ids) == text


def test_min_count_drops_the_rare_ids_and_text_still_round_trips(tmp_path, case):
    tokenizer, model, texts, used, counts = case
    everything = pt.save_trimmed(model, tokenizer, tmp_path / "all", used_ids=used)
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used, counts=counts, min_count=3)
    frequent = used[counts[used] >= 3]
    assert kept.tolist() == kept_token_ids(tokenizer, frequent.tolist(), extra=[50256])
    assert set(frequent.tolist()) <= set(kept.tolist()) and len(kept) < len(everything)
    rare = set(used.tolist()) - set(kept.tolist())
    assert rare and all(counts[i] < 3 for i in rare)  # only ids seen once or twice went (and not their closure)
    trimmed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    torch.testing.assert_close(trimmed.get_input_embeddings().weight, model.get_input_embeddings().weight[kept])
    _round_trips(tmp_path / "t", texts)


def test_max_vocab_keeps_the_most_frequent_ids_that_fit(tmp_path, case):
    tokenizer, model, texts, used, counts = case
    kept = pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used, counts=counts, max_vocab=600)
    assert 550 < len(kept) <= 600
    by_count = used[torch.argsort(counts[used], descending=True, stable=True)].tolist()
    k = next(k for k in range(len(by_count)) if by_count[k] not in set(kept.tolist()))
    assert k > 100  # the prefix of the most frequent ids is kept ...
    parsed = TokenizerJson(tokenizer)
    assert len(kept_token_ids(parsed, sorted(by_count[:k + 1]), extra=[50256])) > 600  # ... as long as it fits
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "t")) == len(kept)
    _round_trips(tmp_path / "t", texts)
    both = pt.save_trimmed(model, tokenizer, tmp_path / "b", used_ids=used, counts=counts, min_count=50,
                           max_vocab=600)
    floor = set(kept_token_ids(parsed, [], extra=[50256]))
    assert len(both) < len(kept) and all(counts[i] >= 50 for i in set(both.tolist()) & set(used.tolist()) - floor)


@pytest.mark.parametrize("options, error, words", [
    ({"min_count": 2}, UsedIdsError, "pass counts="),
    ({"max_vocab": 0, "counts": True}, UsedIdsError, "positive int"),
    ({"min_count": 1.5, "counts": True}, UsedIdsError, "positive int"),
    ({"max_vocab": 100, "counts": True}, VocabularySizeError, "below the 257 ids"),
    ({"max_vocab": 600, "counts": "float"}, UsedIdsError, "integer occurrences"),
    ({"max_vocab": 600, "counts": "long"}, UsedIdsError, "at most V = 50257"),
])
def test_bad_counting_options_are_refused_and_nothing_is_written(tmp_path, case, options, error, words):
    tokenizer, model, _, used, counts = case
    given = {True: counts, "float": counts.float(), "long": torch.cat([counts, counts[:3]])}
    options = dict(options, counts=given[options["counts"]]) if "counts" in options else options
    with pytest.raises(error, match=words):
        pt.save_trimmed(model, tokenizer, tmp_path / "t", used_ids=used, **options)
    assert list(tmp_path.iterdir()) == []


def test_the_trim_command_writes_a_folder_plain_transformers_loads(tmp_path, case, capsys):
    tokenizer, model, texts, used, counts = case
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "news.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    argv = ["trim", str(tmp_path / "model"), str(tmp_path / "news.jsonl"), "--text-column", "body", "--out",
            str(tmp_path / "t"), "--max-vocab", "700", "--json", "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocab_size"] == 50257 and report["num_kept"] <= 700 and report["model_class"] == "GPT2LMHeadModel"
    trimmed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    assert trimmed.config.vocab_size == report["num_kept"] == len(transformers.AutoTokenizer.from_pretrained(
        tmp_path / "t"))
    _round_trips(tmp_path / "t", texts[:1])
    assert cli.main(argv) == 2 and "overwrite" in capsys.readouterr().err  # the folder is there now
    assert cli.main([*argv[:-2], "--overwrite", "--quiet"]) == 0
    assert "trimmed to K = " in capsys.readouterr().out
