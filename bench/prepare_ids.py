"""Tokenizes BBC News with real tokenizers into bench/.ids/, for the benchmarks on a machine without them.

A bare GPU image has neither the tokenizer nor the text packages, so the streams are made here and travel with the
repository: bench/.ids is ignored by git (the text is for research use, never committed) and is named in the
device tool's `carry`:

    python bench/prepare_ids.py                   # all four tokenizers (~1 min; SmolLM2's GGUF loads for ~25 s)
    python bench/prepare_ids.py --tokenizers "bert (MiniLM)" --out /tmp/ids

Each file `bbc_<name>.npz` holds `stream` (every article's ids, special tokens included, concatenated: int32),
`used` (the sorted ids the corpus uses plus the tokenizer's special tokens, as `scan_vocabulary` gives them),
`vocab_size` (len(tokenizer)) and `batch` (4 real rows of 128 ids, for bench/memory.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "examples"))
import assets  # noqa: E402
from ids import IDS_DIR, TOKENIZERS  # noqa: E402

BATCH, SEQ = 4, 128  # bench/memory.py's batch


def prepare(tokenizer_key: str, out: Path) -> Path:
    from pema_triton import scan_vocabulary, special_token_ids

    tokenizer = assets.load_tokenizer(tokenizer_key)
    (texts, _), _, _ = assets.load_bbc_news(2225, 0)
    rows = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows if r])
    used = scan_vocabulary(torch.from_numpy(stream), len(tokenizer), keep=special_token_ids(tokenizer),
                           device="cpu", progress=False)
    batch = np.asarray([r[:SEQ] for r in rows if len(r) >= SEQ][:BATCH], dtype=np.int64)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bbc_{TOKENIZERS[tokenizer_key]}.npz"
    np.savez_compressed(path, stream=stream, used=used.numpy(), vocab_size=np.int64(len(tokenizer)), batch=batch)
    print(f"{path}: {len(stream):,} ids, U = {len(used):,} of V = {len(tokenizer):,}", flush=True)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    p.add_argument("--out", type=Path, default=IDS_DIR)
    args = p.parse_args(argv)
    for key in args.tokenizers:
        prepare(key, args.out)


if __name__ == "__main__":
    main()
