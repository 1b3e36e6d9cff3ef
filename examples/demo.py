"""PEMA on a real encoder and real text: fine-tune all-MiniLM-L6-v2 to classify BBC News, with and without PEMA.

Scans the train and test splits for the token ids they use, replaces the input embedding by a
`CompactEmbedding` over those U rows, fine-tunes, merges the trained rows back, and checks that the result is
the model plain full fine-tuning gives (same seed, same batches, AdamW without weight decay).

    python examples/demo.py                 # ~1 minute on 2 CPU cores
    python examples/demo.py --device cuda   # Triton kernels on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from assets import load_bbc_news, minilm_dir  # noqa: E402

import pema_triton  # noqa: E402
from pema_triton import replace_embeddings, restore_embeddings, scan_vocabulary, special_token_ids  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub name or local folder (default: the offline MiniLM)")
    p.add_argument("--train", type=int, default=320, help="training articles")
    p.add_argument("--test", type=int, default=200, help="held-out articles")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes the model holds for training: weights (parameters and buffers), gradients, optimizer state."""
    return {
        "weights": tensor_bytes(list(model.parameters()) + list(model.buffers())),
        "gradients": tensor_bytes(p.grad for p in model.parameters()),
        "optimizer": tensor_bytes(
            v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim()
        ),
    }


def fine_tune(args, use_pema: bool, batches, test_batches, used_ids, device):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=5).to(device)
    if use_pema:
        # The input embedding becomes a CompactEmbedding over the used rows; the full matrix waits on the CPU.
        print(replace_embeddings(model, used_ids))
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=args.lr, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    step_times, losses = [], []
    for _ in range(args.epochs):
        for input_ids, attention_mask, labels in batches:
            start = time.perf_counter()
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep gradients allocated so their bytes are counted
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - start)
            losses.append(loss.item())
    state = training_state(model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    if use_pema:
        restore_embeddings(model)  # trained rows merged back into the full matrix, the original module back

    model.eval()
    correct = 0
    with torch.no_grad():
        for input_ids, attention_mask, labels in test_batches:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return model, {
        "state": state,
        "peak": peak,
        "step_time": sum(step_times[1:]) / max(1, len(step_times) - 1),  # the first step warms up
        "loss": sum(losses[-5:]) / len(losses[-5:]),
        "accuracy": correct / sum(len(b[2]) for b in test_batches),
        "trainable": trainable,
    }


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.model = args.model or str(minilm_dir())
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" report
    transformers.logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    (train_x, train_y), (test_x, test_y), topics = load_bbc_news(args.train, args.test, seed=args.seed)

    def batched(texts, labels):
        enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        y = torch.tensor(labels)
        return [
            (enc["input_ids"][i : i + args.batch_size].to(device), enc["attention_mask"][i : i + args.batch_size].to(device),
             y[i : i + args.batch_size].to(device))
            for i in range(0, len(texts), args.batch_size)
        ]

    batches, test_batches = batched(train_x, train_y), batched(test_x, test_y)
    # Every split the model will see, plus the special tokens: an id missing here would be an error at test time.
    used_ids = scan_vocabulary([b[0] for b in batches + test_batches], len(tokenizer),
                               keep=special_token_ids(tokenizer), device=device)
    vocab_size, num_used = len(tokenizer), used_ids.numel()
    kernels = "Triton" if pema_triton.ops.use_triton("auto", device) else "PyTorch reference"
    print(f"MiniLM on BBC News ({len(topics)} topics): {args.train} train / {args.test} test articles, "
          f"device {device}, compact embedding via {kernels}")
    print(f"vocabulary: V={vocab_size:,}, used U={num_used:,} ({num_used / vocab_size:.1%})\n")

    results = {}
    for name, use_pema in (("full fine-tuning", False), ("PEMA (input embedding)", True)):
        model, results[name] = fine_tune(args, use_pema, batches, test_batches, used_ids, device)
        results[name]["model"] = model

    mib = 1 << 20
    print("| run | trainable params | weights | gradients | optimizer | step time | train loss | test acc |"
          + (" peak CUDA |" if device.type == "cuda" else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    for name, r in results.items():
        s = r["state"]
        row = (f"| {name} | {r['trainable']:,} | {s['weights'] / mib:.1f} MiB | {s['gradients'] / mib:.1f} MiB | "
               f"{s['optimizer'] / mib:.1f} MiB | {r['step_time'] * 1e3:.0f} ms | {r['loss']:.4f} | {r['accuracy']:.3f} |")
        print(row + (f" {r['peak'] / mib:.0f} MiB |" if r["peak"] is not None else ""))

    full, pema = (r["model"].state_dict() for r in results.values())
    max_diff = max((full[k].float() - pema[k].float()).abs().max().item() for k in full)
    emb_key = next(k for k in full if k.endswith("word_embeddings.weight"))
    unused = torch.ones(vocab_size, dtype=torch.bool, device=device)
    unused[used_ids] = False
    same_unused = torch.equal(full[emb_key][unused], pema[emb_key][unused])
    saved = 1 - sum(results["PEMA (input embedding)"]["state"].values()) / sum(results["full fine-tuning"]["state"].values())
    print(f"\ntraining state saved by PEMA: {saved:.1%}")
    print(f"largest |restored PEMA - full fine-tuning| over all {len(full)} tensors: {max_diff:.3g}")
    print(f"unused embedding rows bit-identical to full fine-tuning: {same_unused}")
    return 0 if same_unused and max_diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
