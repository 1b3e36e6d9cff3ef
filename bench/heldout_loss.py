"""Held-out loss of PEMA's output modes against unrestricted full fine-tuning, on a real LM and real text.

SmolLM2-135M-Instruct (tied embeddings) fine-tuned as a causal LM on BBC News articles, three ways from the same
start with the same batches: full fine-tuning (every row trains), PEMA `frozen`, PEMA `restricted`. The restored
models are evaluated on held-out articles with the full-vocabulary softmax (the model a user deploys); the
restricted model is also evaluated in its own objective (softmax over the used ids) before restore.

    python bench/heldout_loss.py                      # ~5 minutes on 2 CPU cores
    python bench/heldout_loss.py --steps 100 --device cuda
Writes bench/results/heldout_loss_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "examples"), str(Path(__file__).resolve().parent)]
import harness  # noqa: E402
from assets import load_bbc_news, smollm2_dir  # noqa: E402

import pema_triton  # noqa: E402
from pema_triton import replace_embeddings, restore_embeddings, scan_vocabulary, special_token_ids  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=120, help="training articles")
    p.add_argument("--test", type=int, default=40, help="held-out articles")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


@torch.no_grad()
def heldout_loss(model, batches, used_mask=None, own_loss=False) -> float:
    """Mean next-token cross-entropy over the held-out tokens that are not padding.

    Full softmax by default; `used_mask` limits it to the used ids; `own_loss` takes the model's built-in loss
    (a restricted model's: softmax over the used ids, labels remapped by pema_triton).
    """
    model.eval()
    total, count = 0.0, 0
    for ids, labels in batches:
        tokens = int((labels[:, 1:] != -100).sum())
        if own_loss:
            total += model(input_ids=ids, labels=labels).loss.item() * tokens
        else:
            logits = model(input_ids=ids).logits.float()
            if used_mask is not None:
                logits = logits.masked_fill(~used_mask, float("-inf"))
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            ).item()
        count += tokens
    model.train()
    return total / count


def main(argv=None):
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device)
    folder, gguf = smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)

    (train_x, _), (test_x, _), _ = load_bbc_news(args.train, args.test, seed=0)
    def encode(texts):
        enc = tokenizer(texts, truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
        ids = enc["input_ids"].to(device)
        return ids, ids.masked_fill(enc["attention_mask"].to(device) == 0, -100)  # no loss on padding

    (train_ids, train_labels), (test_ids, test_labels) = encode(train_x), encode(test_x)
    starts = [(i * args.batch_size) % len(train_ids) for i in range(args.steps)]
    train_batches = [(train_ids[s : s + args.batch_size], train_labels[s : s + args.batch_size]) for s in starts]
    test_batches = list(zip(test_ids.split(args.batch_size), test_labels.split(args.batch_size)))
    # Every split the model will see, as the method prescribes, plus the tokenizer's special tokens.
    used = scan_vocabulary([train_ids, test_ids], len(tokenizer), keep=special_token_ids(tokenizer))
    used_mask = torch.zeros(len(tokenizer), dtype=torch.bool, device=device)
    used_mask[used.to(device)] = True

    results = {"pretrained": {"heldout_loss": heldout_loss(base.to(device), test_batches)}}
    base.cpu()
    for run in ("full fine-tuning", "pema frozen", "pema restricted"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        model.to(device).train()
        handle = None
        if run != "full fine-tuning":
            handle = replace_embeddings(model, used, output=run.split()[1], tokenizer=tokenizer)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        losses, start = [], time.perf_counter()
        for ids, labels in train_batches:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        record = {"train_loss_last5": sum(losses[-5:]) / 5, "seconds_per_step": seconds / args.steps}
        if handle is not None:
            record["handle"] = handle.summary()
            if handle.output == "restricted":
                record["heldout_loss_restricted_softmax"] = heldout_loss(model, test_batches, own_loss=True)
            restore_embeddings(model)
        record["heldout_loss"] = heldout_loss(model, test_batches)
        record["heldout_loss_used_softmax"] = heldout_loss(model, test_batches, used_mask)
        results[run] = record
        print(run, json.dumps(record), flush=True)
        del model, opt

    full = results["full fine-tuning"]["heldout_loss"]
    for run in ("pema frozen", "pema restricted"):
        r = results[run]
        r["delta_vs_full"] = r["heldout_loss"] - full
        r["ppl_ratio_vs_full"] = math.exp(r["delta_vs_full"])
    out = {
        "config": vars(args) | {"vocab_size": len(tokenizer), "num_used": int(used.numel())},
        "environment": harness.environment() | {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "pema_triton": pema_triton.__version__, "cpu_count": os.cpu_count(),
        },
        "results": results,
    }
    path = Path(args.out or Path(__file__).parent / "results" / f"heldout_loss_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"\nSmolLM2-135M on BBC News: V={len(tokenizer):,}, U={used.numel():,}, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens, lr {args.lr}\n")
    print("| run | held-out loss (full softmax) | vs full fine-tuning | held-out loss (softmax over used ids) |")
    print("|---|---:|---:|---:|")
    print(f"| pretrained | {results['pretrained']['heldout_loss']:.4f} | | |")
    for run in ("full fine-tuning", "pema frozen", "pema restricted"):
        r = results[run]
        delta = f"{r['delta_vs_full']:+.4f}" if "delta_vs_full" in r else ""
        print(f"| {run} | {r['heldout_loss']:.4f} | {delta} | {r['heldout_loss_used_softmax']:.4f} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
