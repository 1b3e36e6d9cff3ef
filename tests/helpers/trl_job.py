"""SFT on the tiny Llama under whichever TRL is importable, for tests/test_trl_versions.py (run with an older TRL's
folder first on PYTHONPATH, tests/ after it):

    python tests/helpers/trl_job.py OUTPUT_DIR RESULT_JSON

Writes {"version", "pema", "baseline" (logged loss and accuracy per step), "max_weight_difference",
"fused" and "restricted" (logged values, or the refusal's message)}: `compact_trainer` against full training with
the unused rows frozen, as tests/test_trl.py checks under the newest TRL.
"""

import copy
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: the kernels under the interpreter on CPU

import trl  # noqa: E402

from helpers import tiny_trl, training  # noqa: E402
from pema_triton import PemaError  # noqa: E402
from pema_triton.hf import compact_trainer  # noqa: E402

KEYS = ("loss", "mean_token_accuracy")


def sft(model, folder):
    return trl.SFTTrainer(model=model, args=tiny_trl.config("sft", folder), train_dataset=tiny_trl.sft_data(),
                          processing_class=tiny_trl.tokenizer())


def main(output_dir: str, result_path: str) -> None:
    model = tiny_trl.model()
    baseline = copy.deepcopy(model)
    trainer = sft(model, f"{output_dir}/pema")
    result = {"version": trl.__version__, "forward": type(model.__dict__.get("forward")).__name__}
    handle = compact_trainer(trainer)
    result["adapted"] = type(model.__dict__.get("forward")).__name__
    trainer.train()
    reference = sft(baseline, f"{output_dir}/baseline")
    training.freeze_rows_outside(baseline, handle.used_ids)
    reference.train()
    result["pema"], result["baseline"] = tiny_trl.logged(trainer, *KEYS), tiny_trl.logged(reference, *KEYS)
    state = baseline.state_dict()
    result["max_weight_difference"] = max((t - state[k]).abs().max().item() for k, t in model.state_dict().items())
    fused = sft(tiny_trl.model(), f"{output_dir}/fused")
    try:
        compact_trainer(fused, fused_loss=True)
        fused.train()
        result["fused"] = tiny_trl.logged(fused, *KEYS)
    except PemaError as err:
        result["fused"] = str(err)
    restricted = sft(tiny_trl.model(), f"{output_dir}/restricted")
    try:
        compact_trainer(restricted, output="restricted")
        restricted.train()
        result["restricted"] = tiny_trl.logged(restricted, *KEYS)
    except PemaError as err:
        result["restricted"] = str(err)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
