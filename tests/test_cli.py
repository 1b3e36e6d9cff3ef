"""`pema-triton scan`: each data format, id columns, the chat template, the estimate, --json, and bad input as a
message with exit status 2. In-process here; tests/test_cli_real.py runs the installed command on real data."""

import json

import pytest

from helpers import tiny_models, tiny_trl
from pema_triton import cli

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its word-level tokenizer (with a chat template) saved as a model folder."""
    folder = tmp_path_factory.mktemp("model")
    tiny_trl.model().save_pretrained(folder)
    tokenizer = tiny_trl.tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _scan(capsys, *args) -> dict:
    assert cli.main(["scan", *map(str, args), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_data_format_gives_the_same_ids(model_dir, tmp_path, capsys):
    texts = ["t5 t6 t7", "t8 t9 t5", "t10"]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    frame = datasets.Dataset.from_dict({"text": texts})
    frame.to_csv(tmp_path / "a.csv")
    frame.to_parquet(tmp_path / "a.parquet")
    frame.save_to_disk(tmp_path / "saved")
    reports = [_scan(capsys, model_dir, tmp_path / name) for name in ("a.txt", "a.jsonl", "a.csv", "a.parquet",
                                                                      "saved")]
    special = [0, 1, 2, 3]
    for report in reports:
        assert report["num_used"] == len({5, 6, 7, 8, 9, 10, *special}) and report["vocab_size"] == tiny_models.V
        assert report["tokens"] == 7 and report["most_frequent"][0] == {"id": 5, "token": "t5", "count": 2}
        assert report["special_ids_kept"] == special


def test_the_estimate_is_the_models_shape_and_modes(model_dir, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("t5 t6 t7\n")
    report = _scan(capsys, model_dir, tmp_path / "a.txt", "--tokens-per-step", "8", "--optimizer", "sgd")
    assert set(report["estimate"]) == {"full", "frozen", "restricted", "fused frozen", "fused restricted"}
    assert report["estimate"]["full"]["optimizer"] == 0 and report["estimate"]["full"]["logits"] == 8 * 97 * 4
    assert report["estimate"]["restricted"]["total"] < report["estimate"]["full"]["total"]
    assert cli.main(["scan", str(model_dir), str(tmp_path / "a.txt"), "--quiet"]) == 0  # the text report
    assert "U = 7 used" in capsys.readouterr().out


def test_id_columns_and_the_chat_template(model_dir, tmp_path, capsys):
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": [40, 41], "labels": [-100, 42]}))
    report = _scan(capsys, model_dir, tmp_path / "ids.jsonl", "--columns", "input_ids", "labels")
    assert report["num_used"] == 4 + 3  # -100 is the ignore index, not an id
    messages = [{"role": "t20", "content": "t21 t22"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}))
    report = _scan(capsys, model_dir, tmp_path / "chat.jsonl", "--chat-template")
    assert {t["id"] for t in report["most_frequent"]} == {20, 21, 22}


@pytest.mark.parametrize("args, message", [
    (["--text-column", "body"], "has no column 'body'"),
    (["--chat-template"], "needs a 'messages' column"),
])
def test_bad_input_is_a_message_and_status_2(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "t5"}))
    assert cli.main(["scan", str(model_dir), str(tmp_path / "a.jsonl"), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["scan", str(model_dir), str(tmp_path / "a.xml"), "--quiet"]) == 2
    assert "is no file or folder" in capsys.readouterr().err
