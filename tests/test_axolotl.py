"""`pema_triton.integrations.axolotl.PemaPlugin` the way Axolotl drives it: registered by its dotted name from the
config's `plugins:` list, its keys merged into Axolotl's config schema, and `post_trainer_create(cfg, trainer)`
called once the trainer exists and before `train()`. Axolotl's own train loop needs its GPU stack, so the trainer
here is the TRL SFTTrainer Axolotl's SFT trainers derive from; the run equals full training with the unused rows
frozen. Axolotl 0.19.0 is installed without dependencies into .venv/optional/axolotl (scripts/setup.sh)."""

import copy
import sys
from pathlib import Path

import pytest

from helpers import tiny_trl, training
from pema_triton import get_handle

AXOLOTL = Path(sys.prefix) / "optional" / "axolotl"
if not (AXOLOTL / "axolotl").is_dir():
    pytest.fail(f"{AXOLOTL} is missing: run scripts/setup.sh (it installs axolotl==0.19.0 --no-deps there)")
sys.path.insert(0, str(AXOLOTL))
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.integrations.config import merge_input_args  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

NAME = "pema_triton.integrations.axolotl.PemaPlugin"


@pytest.fixture
def manager():
    """Axolotl's singleton PluginManager with only PemaPlugin registered, as `prepare_plugins(cfg)` leaves it."""
    PluginManager._instance = None
    manager = PluginManager.get_instance()
    manager.register(NAME)
    assert list(manager.plugins) == [NAME]  # register() prints and swallows an ImportError: check it took
    yield manager
    PluginManager._instance = None


def _sft(model, folder):
    return trl.SFTTrainer(model=model, args=tiny_trl.config("sft", folder), train_dataset=tiny_trl.sft_data(),
                          processing_class=tiny_trl.tokenizer())


def test_the_config_keys_join_axolotls_schema(manager):
    _, schema = merge_input_args()
    fields = schema.model_fields
    assert fields["pema_output"].default == "frozen" and fields["pema_embedding_lr"].default is None
    assert "base_model" in fields  # Axolotl's own keys are still there


def test_post_trainer_create_compacts_and_the_run_equals_frozen_rows_training(manager, tmp_path):
    model = tiny_trl.model()
    baseline = copy.deepcopy(model)
    trainer = _sft(model, tmp_path / "pema")
    cfg = DictDefault({"plugins": [NAME], "pema_output": "frozen", "pema_keep": [90]})
    assert trainer.optimizer is None  # where Axolotl calls the hook
    manager.post_trainer_create(cfg, trainer)
    handle = manager.plugins[NAME].handle
    assert get_handle(model) is handle and 90 in handle.used_ids.tolist()
    assert any(type(c).__name__ == "PemaCallback" for c in trainer.callback_handler.callbacks)
    trainer.train()
    reference = _sft(baseline, tmp_path / "baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    assert get_handle(model) is None  # PemaCallback restored the model at the end
    tiny_trl.assert_same_run(trainer, reference, ("loss",), model, baseline)


def test_trainable_ids_and_embedding_lr_reach_compact_trainer(manager, tmp_path):
    trainer = _sft(tiny_trl.model(), tmp_path)
    cfg = DictDefault({"pema_trainable_ids": [5, 6, 7], "pema_embedding_lr": 1e-4})
    manager.post_trainer_create(cfg, trainer)
    handle = manager.plugins[NAME].handle
    assert handle.trainable_ids.tolist() == [5, 6, 7] and handle.num_used > 3
    trainer.create_optimizer()
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups)[0] == 1e-4
    handle.restore()
