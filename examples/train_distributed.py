"""Fine-tune a causal LM with PEMA on several processes (DDP) with the Hugging Face Trainer.

    torchrun --nproc_per_node 2 examples/train_distributed.py --output-dir runs/pema
    accelerate launch --multi_gpu --num_processes 2 examples/train_distributed.py --output-dir runs/pema
    torchrun --nproc_per_node 2 examples/train_distributed.py --output-dir runs/resumed \
        --resume-from runs/pema/checkpoint-3

Add `--cpu` to train on CPU processes over gloo (how tests/test_train_distributed.py runs it). With accelerate,
`--multi_gpu` is what starts the processes: `accelerate launch --cpu --num_processes 2` starts one (accelerate
1.15 runs several CPU processes only through mpirun), so `--cpu` belongs to this script, not to the launcher.

Every rank scans its own shard of the tokenized text; the scan combines the ranks (one all-reduce of V bytes), so
every rank compacts to the same used ids. The Trainer wraps the compacted model in DDP, which synchronises only
the compact rows' gradients. Its checkpoints (OUTPUT/checkpoint-N) are full-vocabulary under the original names,
with the used ids in pema_compaction.json; a resumed run compacts with those (`Compaction.load`). `PemaCallback`
restores the model when training ends, and OUTPUT/final is a plain checkpoint that transformers loads. Rank 0
writes OUTPUT/run.json: the world size, the losses and the callback's summary.

By default a tiny random Llama (2 layers, D=64, untied head) learns real BBC News text through MiniLM's real
tokenizer (V=30,522), so a run takes seconds on CPU; `--model PATH` fine-tunes a real causal LM instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is no package: the loaders beside this file
from assets import load_bbc_news, minilm_dir  # noqa: E402

from pema_triton import Compaction, replace_embeddings, scan_vocabulary, special_token_ids  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--resume-from", type=Path, help="a checkpoint-N folder of an earlier run")
    parser.add_argument("--model", help="a causal LM folder (default: a tiny random Llama)")
    parser.add_argument("--output", default="frozen", choices=["frozen", "restricted"], help="the head's mode")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="rows per rank and step")
    parser.add_argument("--block", type=int, default=32, help="tokens per row")
    parser.add_argument("--texts", type=int, default=24, help="BBC News articles to train on")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--cpu", action="store_true", help="train on CPU processes (gloo) even with a GPU")
    return parser.parse_args(argv)


def blocks(tokenizer, texts: list[str], block: int):
    """The texts' tokens end to end, cut into rows of `block` ids; labels are the inputs (the model shifts them)."""
    import datasets

    ids = [i for text in texts  # verbose=False: an article longer than MiniLM's 512 positions is fine here
           for i in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.sep_token_id]]
    rows = [ids[start:start + block] for start in range(0, len(ids) - block + 1, block)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def build_model(tokenizer, model_path: str | None, block: int):
    import transformers

    if model_path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=block, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    return transformers.LlamaForCausalLM(config)


def main(argv=None) -> None:
    import transformers

    from pema_triton.hf import PemaCallback

    options = parse_args(argv)
    # Built first: it starts torch.distributed (gloo on CPU, NCCL on GPUs) from the launcher's environment.
    args = transformers.TrainingArguments(
        output_dir=str(options.output_dir), max_steps=options.max_steps, save_steps=options.save_steps,
        per_device_train_batch_size=options.batch_size, learning_rate=options.learning_rate, weight_decay=0.0,
        logging_steps=1, report_to=[], use_cpu=options.cpu, seed=0, data_seed=0, disable_tqdm=True,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(options.model or minilm_dir())
    (texts, _), _, _ = load_bbc_news(options.texts, 0, seed=0)
    train = blocks(tokenizer, texts, options.block)
    model = build_model(tokenizer, options.model, options.block)

    if options.resume_from is not None:
        used = Compaction.load(options.resume_from)  # the rows the checkpoint's optimizer state belongs to
    else:
        mine = train.shard(num_shards=args.world_size, index=args.process_index)
        used = scan_vocabulary(mine, len(tokenizer), keep=special_token_ids(tokenizer), progress=False)
    replace_embeddings(model, used, output=options.output, tokenizer=tokenizer)

    callback = PemaCallback()  # restores the model when training ends
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                   callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(options.resume_from) if options.resume_from else None)
    trainer.save_model(str(options.output_dir / "final"))  # the restored model: a plain checkpoint
    if args.process_index == 0:
        run = {"world_size": args.world_size, "parallel_mode": str(args.parallel_mode),
               "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e], "summary": callback.summary()}
        (options.output_dir / "run.json").write_text(json.dumps(run, indent=2, default=str))
        print(json.dumps(run["summary"], indent=2, default=str))


if __name__ == "__main__":
    main()
