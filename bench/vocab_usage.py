"""How much of each real tokenizer's vocabulary real corpora use, and what PEMA saves for the matching model.

For every tokenizer in examples/assets.py (BERT/MiniLM, GPT-2, SmolLM2, Llama 3, Qwen 2.5, GLM-4) and every corpus
(BBC News, tweets, multilingual word lists): U, U/V, and the AdamW training state (16 bytes a parameter: fp32
weight, gradient, two moments) of the embedding matrices with and without PEMA, for the model shape that uses
that tokenizer (an untied LM head counts twice). PEMA `restricted` keeps U rows of each; `frozen` (the default for
an LM head) also keeps the head's frozen [V, D] fp32 matrix on the device for full-vocabulary logits (encoders:
input side only, so both agree). Like the paper's table, scanned with pema_triton.scan_vocabulary.

    python bench/vocab_usage.py      # ~1 minute on 2 CPU cores
Writes bench/results/vocab_usage.{json,md,png}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import assets  # noqa: E402

from pema_triton import scan_vocabulary, special_token_ids  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ADAMW_BYTES = 16  # fp32 weight + gradient + exp_avg + exp_avg_sq
# The model whose shape (D, tied, has an LM head) each tokenizer's row is computed for.
MODEL_SHAPES = {"bert (MiniLM)": ("bert-base", False), "gpt2": ("GPT-2 124M", True),
                "smollm2-135m": ("SmolLM2-135M", True), "llama-3-8b": ("Llama-3-8B", True),
                "qwen2.5-0.5b": ("Qwen2.5-0.5B", True), "glm-4-9b": ("GLM-4-9B", True)}


def corpora() -> dict[str, list[str]]:
    (bbc, _), _, _ = assets.load_bbc_news(2225, 0)
    words = assets.load_word_lists()
    return {
        "BBC News (2,225 articles, en)": bbc,
        "tweets (38,158, en)": assets.load_tweets(),
        "word lists (8 languages x 5,000)": [" ".join(ws) for ws in words.values()],
    }


def main():
    import transformers

    transformers.logging.set_verbosity_error()
    texts = corpora()
    rows = []
    for name, (_, _, dim, tied) in assets.TOKENIZERS.items():
        tokenizer = assets.load_tokenizer(name)
        vocab_size = len(tokenizer)
        matrices = 1 if tied else 2
        for corpus, docs in texts.items():
            start = time.perf_counter()
            chunks = (torch.tensor(ids) for ids in tokenizer(docs, add_special_tokens=True)["input_ids"] if ids)
            used = scan_vocabulary(chunks, vocab_size, keep=special_token_ids(tokenizer), device="cpu", progress=False)
            shape, has_head = MODEL_SHAPES[name]
            before = matrices * vocab_size * dim * ADAMW_BYTES
            after = matrices * used.numel() * dim * ADAMW_BYTES
            frozen_head = vocab_size * dim * 4 if has_head else 0  # the frozen [V, D] fp32 matrix of the head
            rows.append({
                "tokenizer": name, "model_shape": shape, "corpus": corpus, "V": vocab_size, "U": int(used.numel()),
                "U/V": used.numel() / vocab_size, "D": dim, "tied": tied, "lm_head": has_head,
                "embedding_state_bytes_full": before, "embedding_state_bytes_pema": after,
                "embedding_state_bytes_pema_frozen": after + frozen_head,
                "saved_bytes": before - after, "saved_bytes_frozen": before - after - frozen_head,
                "seconds": time.perf_counter() - start,
            })
            print(f"{name:14s} {corpus:34s} U={used.numel():>7,} of {vocab_size:>7,} "
                  f"({used.numel() / vocab_size:6.1%})", flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vocab_usage.json").write_text(json.dumps(rows, indent=2) + "\n")
    gib = 2**30
    lines = [
        "| tokenizer | model shape | corpus | V | U | U/V | embedding state, full | PEMA `restricted` (saved) "
        "| PEMA `frozen` (saved) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['model_shape']} (D={r['D']}, {_layout(r)}) | "
            f"{r['corpus']} | {r['V']:,} | {r['U']:,} | {r['U/V']:.1%} | "
            f"{r['embedding_state_bytes_full'] / gib:.2f} GiB | "
            f"{r['embedding_state_bytes_pema'] / gib:.2f} GiB ({r['saved_bytes'] / gib:.2f}) | "
            f"{r['embedding_state_bytes_pema_frozen'] / gib:.2f} GiB ({r['saved_bytes_frozen'] / gib:.2f}) |"
        )
    lines += ["", "Embedding state: fp32 weights, gradients and AdamW's two moments of the embedding matrices "
              "(16 bytes a parameter). `frozen` also keeps the head's frozen [V, D] fp32 matrix on the device; "
              "bert-base has no LM head here (classification), so both modes agree."]
    (RESULTS / "vocab_usage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, texts)


def _layout(row) -> str:
    if not row["lm_head"]:
        return "input embedding only"
    return "tied" if row["tied"] else "untied"


def plot(rows, texts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(texts)
    for i, corpus in enumerate(texts):
        shares = [next(r["U/V"] for r in rows if r["tokenizer"] == t and r["corpus"] == corpus) for t in tokenizers]
        ax.bar([x + i * width for x in range(len(tokenizers))], [100 * s for s in shares], width, label=corpus)
    ax.set_xticks([x + width for x in range(len(tokenizers))], tokenizers, rotation=15)
    ax.set_ylabel("vocabulary used, U/V (%)")
    ax.set_title("Share of the vocabulary real corpora use (the rows PEMA trains)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "vocab_usage.png", dpi=120)


if __name__ == "__main__":
    main()
