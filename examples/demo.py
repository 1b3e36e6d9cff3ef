"""PEMA on real models and real text, with and without PEMA, side by side.

Part 1, encoder: all-MiniLM-L6-v2 (BERT) fine-tuned to classify BBC News into 5 topics, plain full fine-tuning
against PEMA on the input embedding. The restored PEMA model must equal the fully fine-tuned one.
Then the PEMA classifier is deployed: `save_trimmed` writes it with only the token rows its data uses (and the
tokenizer cut to match), and plain transformers reloads it; its size and test accuracy print next to the full model's.
Part 2, causal LM: SmolLM2-135M-Instruct (Llama, tied embeddings) fine-tuned on BBC News text with its input and
output embeddings compacted, in both output modes, next to full fine-tuning and next to the exact baseline of
each mode in plain PyTorch (full fine-tuning with the unused rows frozen by a gradient hook, for `restricted`
also masked out of the softmax), with held-out loss for each.

    python examples/demo.py                        # both parts, a few minutes on 2 CPU cores
    python examples/demo.py --part lm --device cuda   # Triton kernels on a GPU
"""

from __future__ import annotations

import os

# Before anything imports tqdm (torch does): it reads this once. Silences the GGUF de-quantisation progress bars.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from assets import load_text_classification, minilm_dir, smollm2_dir  # noqa: E402

import pema_triton  # noqa: E402
from pema_triton import (  # noqa: E402
    replace_embeddings,
    restore_embeddings,
    save_trimmed,
    scan_vocabulary,
    special_token_ids,
)

MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["encoder", "lm", "all"], default="all")
    p.add_argument("--model", default=None, help="encoder: hub name or local folder (default: the offline MiniLM)")
    p.add_argument("--lm-model", default=None, help="causal LM: hub name or local folder (default: offline SmolLM2)")
    p.add_argument("--data", choices=["bbc", "tweets"], default="bbc",
                   help="real text: BBC News (5 topics) or tweets (3 sentiments); the LM trains on its text")
    p.add_argument("--train", type=int, default=320, help="training examples (encoder)")
    p.add_argument("--test", type=int, default=200, help="held-out examples (encoder)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lm-steps", type=int, default=12, help="causal LM training steps")
    p.add_argument("--lm-seq-len", type=int, default=64)
    p.add_argument("--lm-batch-size", type=int, default=4)
    p.add_argument("--lm-lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deploy-dir", default=None, help="where the trimmed classifier is written (default: a temp dir)")
    return p.parse_args(argv)


class MemoryMeter:
    """Peak memory a training run adds: CUDA peak allocated on a GPU, else the process's peak RSS (Linux), minus
    what was in use when the run started (earlier runs' models stay alive for the comparison)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0

    def _rss(self, field: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                return int(next(line for line in f if line.startswith(field)).split()[1]) / 1024
        except (OSError, StopIteration):
            return None

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / MIB
            return
        try:  # "5" resets the peak-RSS counter VmHWM (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.start = self._rss("VmRSS") or 0.0

    def peak(self) -> tuple[float | None, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB - self.start, "peak CUDA added"
        peak = self._rss("VmHWM")
        return (peak - self.start if peak is not None else None), "peak RSS added"


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def training_state(model, optimizer) -> dict[str, int]:
    """Bytes the model holds for training: weights (parameters and buffers), gradients, optimizer state."""
    return {
        "weights": tensor_bytes(list(model.parameters()) + list(model.buffers())),
        "gradients": tensor_bytes(p.grad for p in model.parameters()),
        "optimizer": tensor_bytes(
            v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim()
        ),
    }


def train(model, batches, loss_fn, lr, device, meter):
    """AdamW (weight decay 0, so rows without gradient never move) over `batches`; returns stats."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    meter.reset()
    model.train()
    step_times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated so their bytes are counted
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak, peak_kind = meter.peak()
    return {
        "state": training_state(model, optimizer),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_time": sum(step_times[1:]) / max(1, len(step_times) - 1),  # the first step warms up
        "loss": sum(losses[-3:]) / len(losses[-3:]),
        "peak": peak,
        "peak_kind": peak_kind,
    }


def warm_up(model, batch, loss_fn):
    """One untimed forward+backward, so one-time process costs (allocator and thread pools, the autograd engine)
    land before the first measured run instead of inflating its peak memory."""
    model.train()
    loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)


def max_difference(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def print_table(title, runs, metric_name, vocab_size, num_used):
    print(f"\n{title}\nV={vocab_size:,}, U={num_used:,} ({num_used / vocab_size:.1%})\n")
    kind = next(iter(runs.values()))["peak_kind"]
    print(f"| run | trainable params | weights | gradients | optimizer | {kind} | step time | train loss | "
          f"{metric_name} | max |Δ| vs full fine-tuning | max |Δ| vs exact baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        s = r["state"]
        peak = f"{r['peak']:,.0f} MiB" if r["peak"] is not None else "n/a"
        diff_full = "" if r.get("diff_full") is None else f"{r['diff_full']:.3g}"
        diff = "" if r.get("diff") is None else f"{r['diff']:.3g} ({r['diff_vs']})"
        print(f"| {name} | {r['trainable']:,} | {s['weights'] / MIB:,.1f} MiB | {s['gradients'] / MIB:,.1f} MiB | "
              f"{s['optimizer'] / MIB:,.1f} MiB | {peak} | {r['step_time'] * 1e3:,.0f} ms | {r['loss']:.4f} | "
              f"{r['metric']:.4f} | {diff_full} | {diff} |")


def encoder_part(args, device, meter):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = args.model or str(minilm_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    (train_x, train_y), (test_x, test_y), topics = load_text_classification(args.data, args.train, args.test,
                                                                             seed=args.seed)

    def batched(texts, labels):
        enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        y = torch.tensor(labels)
        return [{"input_ids": enc["input_ids"][i : i + args.batch_size].to(device),
                 "attention_mask": enc["attention_mask"][i : i + args.batch_size].to(device),
                 "labels": y[i : i + args.batch_size].to(device)} for i in range(0, len(texts), args.batch_size)]

    batches, test_batches = batched(train_x, train_y) * args.epochs, batched(test_x, test_y)
    # Every split the model will see, plus the special tokens: an id missing here would be an error at test time.
    used = scan_vocabulary(batches + test_batches, len(tokenizer), keep=special_token_ids(tokenizer), device=device)

    warm_up(AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(topics)).to(device), batches[0],
            lambda m, b: m(**b).loss)
    runs, models = {}, {}
    deploy = None
    for name, pema in (("full fine-tuning", False), ("PEMA (input embedding)", True)):
        torch.manual_seed(args.seed)  # the same fresh classifier head and dropout masks in both runs
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(topics)).to(device)
        if pema:
            print(replace_embeddings(model, used))
        runs[name] = train(model, batches, lambda m, b: m(**b).loss, args.lr, device, meter)
        if pema:
            deploy = deploy_trimmed(args, model, tokenizer)  # while compacted: save_trimmed takes its used ids
            restore_embeddings(model)  # trained rows merged back into the full matrix, the original module back
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                               == b["labels"]).sum()) for b in test_batches)
        runs[name]["metric"] = correct / len(test_x)
        models[name] = model
    # An untied input embedding's unused rows get no gradient in full fine-tuning: it is its own exact baseline.
    diff = max_difference(*models.values())
    runs["PEMA (input embedding)"].update(diff_full=diff, diff=diff, diff_vs="full fine-tuning")
    data = {"bbc": "BBC News topics", "tweets": "tweet sentiment"}[args.data]
    name = args.model or "all-MiniLM-L6-v2"
    print_table(f"Part 1: {name} on {data} ({args.train} train / {args.test} test)", runs,
                "test accuracy", len(tokenizer), used.numel())
    print_deploy(deploy, tokenizer, test_x, test_y, args)
    if args.deploy_dir is None:  # the demo's own temp folder (134 MB a run): nothing reads it after the table
        shutil.rmtree(deploy["root"])
    return runs


def deploy_trimmed(args, model, tokenizer) -> dict:
    """Writes the compacted classifier twice: full size (`save_pretrained`) and trimmed (`save_trimmed`)."""
    import tempfile

    root = args.deploy_dir or tempfile.mkdtemp(prefix="pema_deploy_")
    full_dir, trimmed_dir = os.path.join(root, "full"), os.path.join(root, "trimmed")
    model.save_pretrained(full_dir)  # a compacted model saves full-vocabulary matrices
    tokenizer.save_pretrained(full_dir)
    kept = save_trimmed(model, tokenizer, trimmed_dir, overwrite=True)
    return {"root": root, "full": full_dir, "trimmed": trimmed_dir, "kept": kept}


def _folder_mib(folder) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / MIB


def print_deploy(deploy, tokenizer, test_x, test_y, args):
    """Reloads both directories with plain transformers (AutoModel*, AutoTokenizer) and prints size and accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    print(f"\nDeploy: save_trimmed keeps {len(deploy['kept']):,} of {len(tokenizer):,} token ids (the used ids, "
          f"the special tokens and every single-character piece)\n")
    print("| model | files | vocabulary | test accuracy |\n|---|---:|---:|---:|")
    for name in ("full", "trimmed"):
        folder = deploy[name]
        tok = AutoTokenizer.from_pretrained(folder)
        clf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test_x), args.batch_size):
                enc = tok(test_x[i : i + args.batch_size], truncation=True, max_length=args.max_length,
                          padding=True, return_tensors="pt")
                correct += int((clf(**enc).logits.argmax(-1) == torch.tensor(test_y[i : i + args.batch_size])).sum())
        print(f"| {name} | {_folder_mib(folder):,.1f} MiB | {clf.config.vocab_size:,} | {correct / len(test_x):.4f} |")


def lm_part(args, device, meter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.lm_model:
        tokenizer = AutoTokenizer.from_pretrained(args.lm_model)
        base = AutoModelForCausalLM.from_pretrained(args.lm_model, dtype=torch.float32)
    else:
        folder, gguf = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    n = args.lm_steps * args.lm_batch_size
    (train_x, _), (test_x, _), _ = load_text_classification(args.data, n, 32, seed=args.seed + 1)

    def encode(texts):
        enc = tokenizer(texts, truncation=True, max_length=args.lm_seq_len, padding="max_length", return_tensors="pt")
        ids = enc["input_ids"].to(device)
        return list(zip(ids.split(args.lm_batch_size),
                        ids.masked_fill(enc["attention_mask"].to(device) == 0, -100).split(args.lm_batch_size)))

    batches, test_batches = encode(train_x), encode(test_x)
    used = scan_vocabulary([ids for ids, _ in batches + test_batches], len(tokenizer),
                           keep=special_token_ids(tokenizer), device=device)
    in_used = torch.zeros(len(tokenizer), dtype=torch.bool, device=device)
    in_used[used.to(device)] = True

    @torch.no_grad()
    def heldout_loss(model):
        model.eval()
        total = count = 0
        for ids, labels in test_batches:
            logits = model(input_ids=ids).logits.float()
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
        return total / count

    lm_loss = lambda m, b: m(input_ids=b[0], labels=b[1]).loss  # noqa: E731  (the model's own loss)

    def masked_lm_loss(model, batch):  # the same loss with the unused ids masked out of the softmax
        logits = model(input_ids=batch[0]).logits.float().masked_fill(~in_used, torch.finfo(torch.float32).min)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[1][:, 1:].reshape(-1))

    warm_up(copy.deepcopy(base).to(device), batches[0], lm_loss)
    runs, models = {}, {}
    # Each PEMA mode follows its exact baseline in plain PyTorch: full FT with the unused rows frozen by a gradient
    # hook (every head row gets a gradient through the softmax, so only frozen rows make the two comparable).
    # The fused loss (no logits) computes the `frozen` objective: it follows the same baseline, to fp32 round-off.
    baselines = {"PEMA frozen": "hook baseline", "PEMA frozen + fused loss": "hook baseline",
                 "PEMA restricted": "hook + mask baseline"}
    runs_and_losses = (("full fine-tuning", lm_loss), ("hook baseline", lm_loss), ("PEMA frozen", lm_loss),
                       ("PEMA frozen + fused loss", lm_loss), ("hook + mask baseline", masked_lm_loss),
                       ("PEMA restricted", lm_loss))
    for name, loss_fn in runs_and_losses:
        model = copy.deepcopy(base).to(device)
        handle = None
        if name.startswith("PEMA"):
            fused = "fused" in name
            # On CPU tensors the fused loss streams all 49,152 rows per token in PyTorch chunks: under the Triton
            # interpreter (the test suite sets TRITON_INTERPRET=1) that would take minutes.
            backend = "torch" if fused and device.type == "cpu" else "auto"
            handle = replace_embeddings(model, used, output=name.split()[1], fused_loss=fused, backend=backend,
                                        tokenizer=tokenizer)
            print(handle)
        elif "baseline" in name:
            model.get_input_embeddings().weight.register_hook(lambda g: g * in_used[:, None])
        runs[name] = train(model, batches, loss_fn, args.lm_lr, device, meter)
        if handle is not None:
            restore_embeddings(model)
        runs[name]["metric"] = heldout_loss(model)  # full-vocabulary softmax, on the restored model
        models[name] = model
        del model
    for name in runs:
        if name != "full fine-tuning":
            runs[name]["diff_full"] = max_difference(models[name], models["full fine-tuning"])
    for name, baseline in baselines.items():
        runs[name].update(diff=max_difference(models[name], models[baseline]), diff_vs=baseline)
    print_table(f"Part 2: {args.lm_model or 'SmolLM2-135M (tied)'} on {args.data} text, "
                f"{args.lm_steps} steps of "
                f"{args.lm_batch_size}x{args.lm_seq_len} tokens", runs, "held-out loss", len(tokenizer), used.numel())
    print("\nEach mode equals its exact baseline (`restricted` and the fused loss to fp32 round-off: a softmax over U "
          "columns instead of V, or the fused loss's softmax and head gradient summed by chunks of tokens, which Adam "
          "can amplify for a weight whose gradient is near zero). All differ from full fine-tuning, "
          "which also trains the unused rows of the tied head; `restricted` trains a softmax over the used ids "
          "only, so its held-out loss under the full vocabulary differs by design (docs/exactness.md: held-out loss "
          "of the output modes).")
    return runs


def main(argv=None):
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" report
    transformers.logging.disable_progress_bar()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    kernels = ("Triton kernels" if pema_triton.resolve_backend("auto", device) == "triton"
               else "the PyTorch reference path")
    print(f"device {device}: compact embeddings run {kernels}")
    meter = MemoryMeter(device)
    # The exit code says whether PEMA matched its exact baselines. On CPU the same gradient sums run in the same
    # order: bit for bit. Elsewhere (GPU atomics; `restricted`'s U-column softmax) the gradients agree to round-off,
    # which Adam's m/sqrt(v) can turn into up to 2 lr per step for a weight whose gradient is near zero.
    exact = device.type == "cpu"

    def matches(diff, lr, steps, exact_here=exact):
        return diff == 0 if exact_here else diff <= 2 * lr * steps

    ok = True
    if args.part in ("encoder", "all"):
        runs = encoder_part(args, device, meter)
        ok &= matches(runs["PEMA (input embedding)"]["diff"], args.lr,
                      args.epochs * -(-args.train // args.batch_size))
    if args.part in ("lm", "all"):
        runs = lm_part(args, device, meter)
        ok &= matches(runs["PEMA frozen"]["diff"], args.lm_lr, args.lm_steps)
        ok &= matches(runs["PEMA restricted"]["diff"], args.lm_lr, args.lm_steps, exact_here=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
