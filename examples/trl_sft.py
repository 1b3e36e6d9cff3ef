"""SmolLM2-135M-Instruct fine-tuned on BBC News through TRL's SFTTrainer, with PEMA in one call.

    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    handle = compact_trainer(trainer)        # scans what the trainer feeds, compacts, adapts TRL's fused head
    trainer.train()                          # the model is restored (full vocabulary) at the end

Next to it, the exact baseline: the same SFT run on the uncompacted model with every row the data never uses frozen
by a gradient hook. PEMA must give the same losses (to fp32 round-off); it holds less training state.

    python examples/trl_sft.py                  # PEMA and the baseline, 6 AdamW steps each (~2 min on 2 CPU cores)
    python examples/trl_sft.py --output restricted --run pema
    python examples/trl_sft.py --run baseline --json b.json   # one run a process: its peak RSS is its own
"""

from __future__ import annotations

import os
import resource

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no GGUF de-quantisation or map bars

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from assets import load_bbc_news, smollm2_dir  # noqa: E402

from pema_triton.hf import PemaCallback, compact_trainer, trainer_used_ids  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--articles", type=int, default=24, help="BBC News articles to train on")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--output", choices=("frozen", "restricted"), default="frozen")
    parser.add_argument("--fused-loss", action="store_true", help="pema's fused loss outside TRL's own calls too")
    parser.add_argument("--run", choices=("both", "pema", "baseline"), default="both")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # GGUF weights are de-quantised to fp32 on load, but transformers still marks the model quantized, and the
    # Trainer refuses to fully fine-tune a quantized model: it is a plain fp32 model from here on.
    model.is_quantized, model.hf_quantizer = False, None
    return tokenizer, model


def sft_trainer(model, tokenizer, texts, args, output_dir):
    import datasets
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, learning_rate=5e-5, logging_steps=1, save_strategy="no",
                       report_to=[], seed=0, data_seed=0, bf16=False, use_cpu=not torch.cuda.is_available(),
                       gradient_checkpointing=False, disable_tqdm=True)
    return SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                      processing_class=tokenizer)


def freeze_rows_outside(model, used_ids):
    """The baseline's only change: the rows PEMA compacts away get no gradient (one matrix: SmolLM2 is tied)."""
    frozen = torch.ones(model.get_input_embeddings().num_embeddings, dtype=torch.bool)
    frozen[used_ids] = False
    for param in {id(p): p for p in (model.get_input_embeddings().weight,
                                     model.get_output_embeddings().weight)}.values():
        param.register_hook(lambda grad: grad.masked_fill(frozen[:, None].to(grad.device), 0))


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def callback_of(trainer):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, PemaCallback))


def run_pema(model, tokenizer, texts, args, folder) -> dict:
    trainer = sft_trainer(model, tokenizer, texts, args, folder)
    handle = compact_trainer(trainer, output=args.output, fused_loss=args.fused_loss)
    print(f"compacted: U = {handle.num_used:,} of V = {handle.vocab_size:,} rows "
          f"({handle.num_used / handle.vocab_size:.1%}), output={args.output}")
    trainer.train()
    return {"losses": losses(trainer), **callback_of(trainer).summary()}


def run_baseline(model, tokenizer, texts, args, folder) -> dict:
    trainer = sft_trainer(model, tokenizer, texts, args, folder)
    trainer.add_callback(PemaCallback())  # it measures an uncompacted run the same way
    freeze_rows_outside(model, trainer_used_ids(trainer))  # the ids compact_trainer keeps
    trainer.train()
    return {"losses": losses(trainer), **callback_of(trainer).summary()}


def report(result: dict) -> None:
    runs = [name for name in ("pema", "baseline") if name in result]
    print(f"\n{'step':>4}" + "".join(f" {name + ' loss':>14}" for name in runs) + (" |diff|" if len(runs) == 2 else ""))
    for step, row in enumerate(zip(*(result[name]["losses"] for name in runs)), 1):
        print(f"{step:>4}" + "".join(f" {loss:>14.5f}" for loss in row) + (f" {abs(row[0] - row[1]):.2e}"
                                                                           if len(row) == 2 else ""))
    for name in runs:
        state = result[name]
        print(f"{name:>8}: training state {state['training_state_bytes'] / 2**20:,.0f} MiB (weights "
              f"{state['weights_bytes'] / 2**20:,.0f}, gradients {state['gradients_bytes'] / 2**20:,.0f}, optimizer "
              f"{state['optimizer_bytes'] / 2**20:,.0f}), {state['mean_step_seconds']:.2f} s/step")
    print(f"peak RSS of this process: {result['peak_rss_bytes'] / 2**20:,.0f} MiB")


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer, model = load_model()
    (texts, _), _, _ = load_bbc_news(args.articles, 0, seed=0)
    result = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.run == "both":
            baseline_model = copy.deepcopy(model)
        if args.run in ("both", "pema"):
            result["pema"] = run_pema(model, tokenizer, texts, args, f"{tmp}/pema")
        if args.run in ("both", "baseline"):
            result["baseline"] = run_baseline(model if args.run == "baseline" else baseline_model, tokenizer, texts,
                                              args, f"{tmp}/baseline")
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
