"""Distributed manners in one process: outside the main process (RANK set by torchrun / accelerate before the
group exists) pema_triton neither logs, warns nor shows the scan's bar; the bar also follows `datasets`' progress
setting and a Trainer's `disable_tqdm`. The real 2-rank run is in tests/test_distributed.py (slow)."""

import logging
import sys
import warnings

import pytest
import torch

from helpers import tiny_models, tiny_trl
from pema_triton import replace_embeddings, scan_vocabulary

datasets = pytest.importorskip("datasets")
BAR = "scanning vocabulary"


def _batches(n=120):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, 60, (6,), generator=gen) for _ in range(n)]


def _bar_shown(capsys, **kwargs) -> bool:
    scan_vocabulary(_batches(), tiny_models.V, backend="torch", **kwargs)  # the bar is the point, not the kernel
    return BAR in capsys.readouterr().err


def test_the_bar_shows_by_default_in_the_main_process_only(capsys, monkeypatch):
    assert _bar_shown(capsys)
    assert not _bar_shown(capsys, progress=False)
    monkeypatch.setenv("RANK", "1")
    assert not _bar_shown(capsys)
    assert _bar_shown(capsys, progress=True)  # asked for by name: shown wherever


def test_the_bar_follows_datasets_progress_setting(capsys, monkeypatch):
    datasets.disable_progress_bars()
    try:
        assert not _bar_shown(capsys)
    finally:
        datasets.enable_progress_bars()
    assert _bar_shown(capsys)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not imported: its environment variable decides
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    assert not _bar_shown(capsys)


def test_logs_and_warnings_come_from_the_main_process_only(caplog, monkeypatch):
    used = torch.arange(10, 40)  # lacks the pad / eos ids the config names: a warning
    for rank, expected in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pema_triton"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = replace_embeddings(tiny_models.build("llama-untied"), used)
        assert sum("compacted" in r.getMessage() for r in caplog.records) == expected, rank
        assert sum("lack special tokens" in str(w.message) for w in caught) == expected, rank
        handle.restore()


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_compact_trainer_shows_the_bar_as_the_trainer_shows_its_own(tmp_path, capsys, disable_tqdm):
    trl = pytest.importorskip("trl")
    from pema_triton.hf import compact_trainer

    trainer = trl.SFTTrainer(model=tiny_trl.model(), train_dataset=tiny_trl.sft_data(rows=120),
                             args=tiny_trl.config("sft", tmp_path, disable_tqdm=disable_tqdm),
                             processing_class=tiny_trl.tokenizer())
    capsys.readouterr()
    compact_trainer(trainer, callback=False)
    assert (BAR in capsys.readouterr().err) is not disable_tqdm
