"""Memory PEMA saves in one training step (forward, backward, AdamW step) of real model shapes.

Shapes of bert-base, xlm-roberta-base, Llama-3-8B and Qwen2.5-0.5B with 2 transformer layers (the embeddings make
the difference), random weights; U from the matching real tokenizer over BBC News (bench/.ids, or
examples/assets.py; where neither is here, synthetic Zipf ids, said in the notes). Runs without PEMA and with PEMA
(`frozen` and `restricted` for causal LMs, the input side for encoders), and reports the bytes the model holds for
training (weights and buffers, gradients, optimizer state, read off the real tensors after the step), the logits of
one batch, and on a GPU the peak CUDA memory. A model whose training state does not fit in this machine's memory is
built on the meta device: its bytes are computed, not run (marked).

    python bench/memory.py [--device cuda]
Writes bench/results/memory_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

# The repository root too: a bare GPU image runs this without pema_triton installed.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "examples"),
                str(Path(__file__).resolve().parent)]
import assets  # noqa: E402
import harness  # noqa: E402

from pema_triton import replace_embeddings, scan_vocabulary, special_token_ids  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH, SEQ = 4, 128


def shapes():
    """(name, builder(config kwargs) -> model, tokenizer key for U, causal LM?, note)."""
    import transformers as T

    return [
        ("bert-base", lambda: T.BertForSequenceClassification(T.BertConfig(
            vocab_size=30522, hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
            num_labels=5)), "bert (MiniLM)", False, ""),
        ("xlm-roberta-base", lambda: T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(
            vocab_size=250002, hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
            pad_token_id=1, num_labels=5)), "qwen2.5-0.5b", False,
         "U/V from the Qwen 2.5 tokenizer (no XLM-R tokenizer installs offline)"),
        ("Llama-3-8B", lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=128256, hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, tie_word_embeddings=False)), "llama-3-8b", True, ""),
        ("Qwen2.5-0.5B", lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
            vocab_size=151936, hidden_size=896, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, tie_word_embeddings=True)), "qwen2.5-0.5b", True, ""),
    ]


def tensor_bytes(tensors, device=None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors
               if t is not None and (device is None or t.device.type == device.type))


def state_bytes(model, optimizer, device) -> dict[str, int]:
    """Bytes on `device`: weights and buffers, gradients (allocated ones), optimizer state; and host-offloaded."""
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else (p if p.requires_grad else None) for p in params]
    if optimizer is not None and optimizer.state:
        opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()]
    else:  # not stepped (meta): AdamW keeps two moments shaped like each trainable parameter
        opt = [p for p in params if p.requires_grad] * 2
    return {
        "weights": tensor_bytes(params + list(model.buffers()), device),
        "gradients": tensor_bytes(grads, device),
        "optimizer": tensor_bytes(opt, device),
    }


def used_fraction_ids(tokenizer_key, vocab_size):
    """(used ids, one batch of token ids, the tokenizer's size): see `used_ids_and_batch`, which also says whence."""
    return used_ids_and_batch(tokenizer_key, vocab_size)[:3]


def used_ids_and_batch(tokenizer_key, vocab_size):
    """Used ids of the real tokenizer over BBC News, one batch of real token ids, the tokenizer's size, and where they
    came from: bench/.ids where bench/prepare_ids.py made it (a bare GPU image has no tokenizer packages), else
    tokenized here, else (neither here) synthetic: the Zipf source's U (a quarter of V, about the 20-24% real 128k-152k
    tokenizers use on BBC News) and a batch of Zipf ids over it, so that the run goes on and says so."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ids import MissingIds, load_prepared, zipf

    try:
        prepared = load_prepared(tokenizer_key)
        used = torch.from_numpy(prepared["used"]).long()
        return (used[used < vocab_size], torch.from_numpy(prepared["batch"]), prepared["vocab_size"],
                f"BBC News through the {tokenizer_key} tokenizer (bench/.ids)")
    except MissingIds:
        pass
    try:
        tokenizer = assets.load_tokenizer(tokenizer_key)
    except Exception as missing:  # noqa: BLE001 - ImportError, a missing package's folder, a broken tokenizer file
        ids, used, _ = zipf(vocab_size, BATCH * SEQ)
        why = f"{type(missing).__name__}: {str(missing).splitlines()[0][:100] if str(missing) else ''}"
        print(f"no bench/.ids and no {tokenizer_key} tokenizer here ({why}): synthetic ids", file=sys.stderr)
        return (used, ids.view(BATCH, SEQ), vocab_size, f"synthetic: {len(used):,} random ids of V, a batch of Zipf(1) "
                f"ids over them (no bench/.ids for {tokenizer_key} and no tokenizer here: {why})")
    (texts, _), _, _ = assets.load_bbc_news(2225, 0)
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    used = scan_vocabulary((torch.tensor(i) for i in ids if i), len(tokenizer), keep=special_token_ids(tokenizer),
                           device="cpu", progress=False)
    used = used[used < vocab_size]
    batch = torch.tensor([row[:SEQ] for row in ids if len(row) >= SEQ][:BATCH])
    return used, batch, len(tokenizer), f"BBC News through the {tokenizer_key} tokenizer (tokenized here)"


def fits_here(model_factory, device) -> bool:
    with torch.device("meta"):
        n = sum(p.numel() for p in model_factory().parameters())
    need = 16 * n * 1.3  # AdamW fp32 state and activations
    if device.type == "cuda":
        return need < torch.cuda.get_device_properties(device).total_memory
    import os

    return need < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.6


def measure(name, factory, causal, mode, used, batch, device, run):
    torch.manual_seed(0)
    target = device if run else torch.device("meta")
    with torch.device(target):
        model = factory()
    if not run and not next(model.parameters()).is_meta:  # some transformers init paths ignore the device context
        model = model.to("meta")
    model.train()
    if mode is not None:
        replace_embeddings(model, used, output=mode if causal else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    record = {"model": name, "mode": mode or "none", "ran": run}
    if run:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        x = batch.to(device)
        start = time.perf_counter()
        kwargs = {"labels": x} if causal else {"labels": torch.zeros(len(x), dtype=torch.long, device=device)}
        out = model(input_ids=x, **kwargs)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
            record["peak_cuda_bytes_above_start"] = torch.cuda.max_memory_allocated() - base
        record["step_seconds"] = time.perf_counter() - start
        record["logits_bytes"] = out.logits.numel() * out.logits.element_size()
    else:
        record["logits_bytes"] = BATCH * SEQ * (model.config.vocab_size if causal else model.config.num_labels) * 4
    record.update(state_bytes(model, optimizer, target))
    record["total_training_state"] = record["weights"] + record["gradients"] + record["optimizer"]
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for memory_<device>.{json,md}")
    p.add_argument("--models", nargs="+", help="only these (bert-base, xlm-roberta-base, Llama-3-8B, Qwen2.5-0.5B)")
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    rows, sources = [], {}
    for name, factory, tokenizer_key, causal, note in shapes():
        if args.models and name not in args.models:
            continue
        with torch.device("meta"):
            vocab_size = factory().config.vocab_size
        used, batch, tokenizer_size, source = used_ids_and_batch(tokenizer_key, vocab_size)
        sources[name] = source
        if tokenizer_key == "qwen2.5-0.5b" and not causal:  # proxy: the same share of a 250k vocabulary
            share = len(used) / tokenizer_size
            used = torch.linspace(0, vocab_size - 1, int(share * vocab_size)).long().unique()
            batch = used[torch.randint(0, len(used), (BATCH, SEQ), generator=torch.Generator().manual_seed(0))]
        run = fits_here(factory, device)
        for mode in [None] + (["frozen", "restricted"] if causal else ["input"]):
            record = measure(name, factory, causal, None if mode is None else ("frozen" if mode == "input" else mode),
                             used, batch, device, run)
            record.update({"mode": mode or "none", "V": vocab_size, "U": int(len(used)), "note": note})
            if mode == "restricted":
                record["logits_bytes"] = record["logits_bytes"] if run else BATCH * SEQ * len(used) * 4
            rows.append(record)
            print(json.dumps(record), flush=True)
    write(args.out, device, rows, sources)


def write(out: Path, device, rows: list[dict], sources: dict[str, str]) -> None:
    """memory_<device>.json (rows, environment, where each model's ids came from) and memory_<device>.md."""
    import transformers

    tag = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    env = harness.environment() | {"device": tag, "transformers": transformers.__version__}
    (out / f"memory_{tag}.json").write_text(json.dumps({"environment": env, "rows": rows, "ids": sources}, indent=2)
                                            + "\n")
    mib = 2**20
    lines = [
        f"One training step (B={BATCH}, T={SEQ}, AdamW, fp32), 2 transformer layers; device {tag}, "
        f"torch {env['torch']}, transformers {env['transformers']}, commit {env['git_commit']}.",
        "",
        "| model | PEMA | V | U | weights+buffers | gradients | optimizer | total | logits | peak CUDA | measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peak = f"{r['peak_cuda_bytes'] / mib:,.0f} MiB" if "peak_cuda_bytes" in r else "n/a"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['V']:,} | {r['U']:,} | {r['weights'] / mib:,.0f} MiB | "
            f"{r['gradients'] / mib:,.0f} MiB | {r['optimizer'] / mib:,.0f} MiB | "
            f"{r['total_training_state'] / mib:,.0f} MiB | "
            f"{r['logits_bytes'] / mib:,.1f} MiB | {peak} | {'ran' if r['ran'] else 'computed (meta)'} |"
        )
    notes = sorted({r["note"] for r in rows if r["note"]}) + [
        f"{name}: synthetic ids, not a tokenizer's: {source}." for name, source in sources.items()
        if source.startswith("synthetic")] + [
        "Counted: tensors the model holds on the device, after the step. Not counted: the full original matrices "
        "replace_embeddings keeps for restore (offload='cpu'): host memory, which leaves the GPU's memory on a GPU "
        "but is the same RAM on a CPU-only run.",
        "A `frozen` head keeps a [V, D] frozen buffer on the device (it needs every row for full logits), so its "
        "weights can exceed the uncompacted model's; gradients and optimizer state cover only the U used rows.",
    ]
    lines += [""] + [f"- {n}" for n in notes]
    (out / f"memory_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
