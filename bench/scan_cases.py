"""Scan benchmarks: the sorted used ids of N token ids, as `torch.unique` gives them; every provider checked first.

Providers (all but `pema-map-only` return the sorted used ids: the same work):
- `pema`: `scan_ids` into a [V] byte map, then the ids read out of it; `pema-map-only`: the marking alone, what
  each further chunk of a streamed dataset costs; `pema-packed-bits`: the layout not chosen (a bit per id, atomic
  OR), a Triton kernel only.
- `torch.unique` (baseline), `torch.bincount` (+ nonzero).
- On a CPU, upstream PEMA's counter: `numpy-bincount-datasets.map` (`upstream_counts`, which bench/peers.py trains
  with too: a numpy-formatted `datasets.Dataset` of 512-id rows, a batched `map` of 1,000 rows that returns
  `np.bincount` of each batch as [V] counts, summed, then `np.flatnonzero`) and its core without datasets,
  `numpy-bincount` (`np.bincount` + `np.flatnonzero` on the whole id matrix).

Byte floor: the ids read (N x id bytes) + the used ids written (U x 8). The [V] map is 0.03-1 MB and stays in L2.
"""

from __future__ import annotations

import numpy as np
import torch
from harness import DEVICE, ON_GPU, Budget, Unavailable, dry_run, measure, select, skipped, triton_kernels
from ids import MissingIds, ids_for

import pema_triton
from pema_triton.vocab import used_ids_from_byte_map

PROVIDERS = ["pema", "pema-map-only", "pema-packed-bits", "torch.unique", "torch.bincount", "numpy-bincount",
             "numpy-bincount-datasets.map"]
BASELINES = {"scan": "torch.unique"}
UPSTREAM_ROW = 512  # ids per dataset row for the upstream counter (a typical max_length)


def grid() -> list[tuple]:
    """(V, ids source, N, id dtype) in priority order: 10^8 ids at V = 128,256 first (the goal case)."""
    if dry_run():
        return [(30_522, "bert (MiniLM)", 10_240, torch.int64), (30_522, "zipf", 10_240, torch.int32)]
    if not ON_GPU:
        return [(v, src, 1_048_576, torch.int64) for v, src in
                [(30_522, "bert (MiniLM)"), (128_256, "llama-3-8b"), (128_256, "zipf"), (250_002, "zipf")]]
    big = [(128_256, src, 10**8, dt) for dt in (torch.int32, torch.int64) for src in ("llama-3-8b", "zipf")]
    return big + [(250_002, "zipf", 10**8, torch.int64), (30_522, "bert (MiniLM)", 10**8, torch.int64),
                  (128_256, "llama-3-8b", 1_048_576, torch.int64), (128_256, "zipf", 1_048_576, torch.int64)]


def case_name(V, source, N, dtype) -> str:
    src = "zipf" if source == "zipf" else "bbc-" + source.split()[0]
    count = f"1e{len(str(N)) - 1}" if N >= 10**6 and str(N).strip("0") == "1" else str(N)  # N1e8, N1048576
    return f"V{V}-{src}-N{count}-{str(dtype).split('.')[-1]}"


def run(budget: Budget, rounds: int, cases: list[str] | None = None) -> list[dict]:
    """Rows of the grid's cases, or of those whose name matches one of the patterns `cases`, in their order."""
    rows = []
    for case in select(grid(), cases, case_name):
        V, source, N, dtype = case
        base = {"op": "scan", "case": case_name(*case), "V": V, "N": N, "dtype": str(dtype), "ids": source}
        if budget.spent():
            for p in PROVIDERS:
                skipped(rows, base | {"provider": p}, "time budget spent")
            continue
        try:
            ids, _, facts = ids_for(source, V, N, DEVICE)
        except MissingIds as missing:
            rows += [base | {"provider": p, "status": "unavailable", "error": str(missing)} for p in PROVIDERS]
            continue
        ids = ids.to(dtype)
        expected = torch.unique(ids)
        base |= {"U_found": len(expected), **facts}
        floor = N * ids.element_size() + len(expected) * 8
        rows += [measure(base | {"provider": p},
                         lambda p=p: scan_provider(p, ids, V, expected), floor_bytes=floor, rounds=rounds)
                 for p in PROVIDERS]
        del ids, expected
    return rows


def scan_provider(provider: str, ids: torch.Tensor, V: int, expected: torch.Tensor):
    """(fn, check) for one provider; check compares the sorted used ids with torch.unique's."""
    byte_map = torch.zeros(V, dtype=torch.uint8, device=ids.device)

    def mark():
        byte_map.zero_()
        pema_triton.scan_ids(ids, byte_map)
        return byte_map

    if provider == "pema-packed-bits":
        fn = _packed(ids, V)
    elif provider.startswith("numpy"):
        fn = _upstream(ids, V, with_datasets=provider.endswith("datasets.map"))
    else:
        fn = {"pema": lambda: used_ids_from_byte_map(mark()), "pema-map-only": mark,
              "torch.unique": lambda: torch.unique(ids),
              "torch.bincount": lambda: torch.nonzero(torch.bincount(ids, minlength=V)).flatten()}[provider]

    def check(out):
        found = torch.nonzero(out).flatten() if provider == "pema-map-only" else torch.as_tensor(out).to(ids.device)
        if not torch.equal(found, expected.to(found.dtype)):
            raise AssertionError(f"{len(found)} used ids found, torch.unique finds {len(expected)}, or they differ")

    return fn, check


def _packed(ids, V):
    kernels = triton_kernels(ids.device)
    words = torch.zeros((V + 31) // 32, dtype=torch.int32, device=ids.device)

    def packed():
        words.zero_()
        kernels.scan_ids_packed(ids, words, V)
        return kernels.used_ids_from_packed(words, V)

    return packed


def _upstream(ids: torch.Tensor, V: int, *, with_datasets: bool):
    """Upstream PEMA's counter on the CPU: `np.bincount` over the id matrix, through `datasets.map` or not."""
    if ON_GPU:
        raise Unavailable("the upstream counter runs on the CPU; timed on the CPU run, not beside a GPU")
    n = len(ids) // UPSTREAM_ROW * UPSTREAM_ROW
    if n != len(ids):
        raise Unavailable(f"N is not a multiple of the {UPSTREAM_ROW}-id rows")
    rows = ids.view(-1, UPSTREAM_ROW).numpy()
    if not with_datasets:
        return lambda: np.flatnonzero(np.bincount(rows.ravel(), minlength=V))
    try:
        import datasets
    except ImportError:
        raise Unavailable("datasets is not installed") from None
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    datasets.disable_progress_bars()
    return lambda: np.flatnonzero(upstream_counts(dataset, V))


def upstream_counts(dataset, vocab_size: int, columns=("input_ids",), batch_size: int = 1000) -> np.ndarray:
    """Upstream PEMA's token counter (its TokenCounter): a batched `map` over the numpy-formatted dataset that
    returns one `np.bincount` of [V] per batch of 1,000 rows (its default), summed afterwards; a DatasetDict's
    splits are summed. bench/peers.py trains with it too."""
    if isinstance(dataset, dict):  # a DatasetDict (a dict subclass): every split the model will see
        return sum(upstream_counts(split, vocab_size, columns, batch_size) for split in dataset.values())

    def count(batch):  # batch[column]: a [rows, length] numpy array (the numpy format)
        total = np.zeros(vocab_size, dtype=np.int64)
        for column in columns:
            total += np.bincount(batch[column].reshape(-1), minlength=vocab_size)
        return {"counts": [total]}

    counted = dataset.with_format("numpy").map(count, batched=True, batch_size=batch_size, keep_in_memory=True,
                                               remove_columns=dataset.column_names, load_from_cache_file=False)
    return np.sum(np.stack(list(counted["counts"])), axis=0)
