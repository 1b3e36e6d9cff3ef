"""The `pema-triton` command (also `python -m pema_triton`).

    pema-triton scan MODEL_OR_TOKENIZER DATA... [--text-column text] [--columns input_ids ...] [--chat-template]
                     [--optimizer adamw] [--dtype bfloat16] [--tokens-per-step N] [--top 20] [--json]
    pema-triton trim MODEL DATA... --out DIR [--min-count N] [--max-vocab K] [--overwrite] [--json]

`scan` tokenizes DATA (text, JSONL, CSV or Parquet files, or a folder `datasets` saved) with the model's own
tokenizer, scans the ids, and prints V, U and the share used, the most frequent ids, and, where MODEL has a config,
the training-state bytes of each mode for that model's shape (:func:`pema_triton.estimate`).

`trim` scans DATA the same way and writes MODEL and its tokenizer cut to the ids it uses
(:func:`pema_triton.save_trimmed`, with the scan's counts for `--min-count` / `--max-vocab`) to DIR, a model folder
plain transformers loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import PemaError

__all__ = ["main"]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run_scan(args) if args.command == "scan" else run_trim(args)
    except PemaError as err:
        print(f"pema-triton: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pema-triton", description="Partial Embedding Matrix Adaptation.")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="which token ids DATA uses, and what PEMA would save")
    scan.add_argument("model", help="a model or tokenizer folder (from_pretrained)")
    _add_data_arguments(scan)
    scan.add_argument("--optimizer", default="adamw")
    scan.add_argument("--dtype", default=None, help="training dtype of the estimate (default: the model's)")
    scan.add_argument("--tokens-per-step", type=int, help="count the logits of a step of this many tokens")
    scan.add_argument("--top", type=int, default=20, help="most frequent ids to list")
    trim = commands.add_parser("trim", help="save MODEL and its tokenizer cut to the ids DATA uses")
    trim.add_argument("model", help="a model folder (from_pretrained) with its tokenizer")
    _add_data_arguments(trim)
    trim.add_argument("--out", required=True, type=Path, help="the trimmed model folder to write")
    trim.add_argument("--min-count", type=int, help="keep only ids DATA holds at least this often")
    trim.add_argument("--max-vocab", type=int, help="keep at most this many ids (the most frequent that fit)")
    trim.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def _add_data_arguments(command: argparse.ArgumentParser) -> None:
    """What both commands read, and how."""
    command.add_argument("data", nargs="+", type=Path, help=".txt (a text a line), .jsonl, .csv, .parquet or a "
                                                            "saved datasets folder")
    command.add_argument("--text-column", default="text")
    command.add_argument("--columns", nargs="+", help="columns of token ids to scan as they are (no tokenizing)")
    command.add_argument("--chat-template", action="store_true", help="render a 'messages' column with the chat "
                                                                      "template first")
    command.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def _scanned(args, tokenizer):
    """(the scan with counts, the special ids kept, the used ids) of DATA under `tokenizer`."""
    from .vocab import VocabularyScan, special_token_ids

    scan = VocabularyScan(len(tokenizer), count=True)
    for ids in _id_chunks(args, tokenizer):
        scan.update(ids)
    special = special_token_ids(tokenizer)
    return scan, special, scan.used_ids(keep=special)


def run_scan(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from .sizing import estimate

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    scan, special, used = _scanned(args, tokenizer)
    counts = scan.counts
    top = torch.argsort(counts, descending=True, stable=True)[: args.top]
    report = {"model": args.model, "vocab_size": len(tokenizer), "num_used": used.numel(),
              "share_used": used.numel() / len(tokenizer), "tokens": int(counts.sum()),
              "special_ids_kept": special,
              "most_frequent": [{"id": int(i), "token": tokenizer.convert_ids_to_tokens(int(i)),
                                 "count": int(counts[i])} for i in top if counts[i] > 0]}
    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError):
        return report | {"estimate": None, "estimate_note": "no model config beside the tokenizer"}
    dtype = getattr(torch, args.dtype) if args.dtype else getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    report["estimate"] = estimate(config, used, optimizer=args.optimizer, dtype=dtype,
                                  tokens_per_step=args.tokens_per_step)
    report["estimate_dtype"] = str(dtype).removeprefix("torch.")
    return report


def run_trim(args) -> dict:
    import transformers

    from .trim import save_trimmed

    config = transformers.AutoConfig.from_pretrained(args.model)
    architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    model_class = getattr(transformers, architecture, None) or transformers.AutoModel
    # `dtype=` from transformers 4.56 on (the `hf` extra allows 4.45): before, `torch_dtype=`.
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    model = model_class.from_pretrained(args.model, **{dtype_key: "auto"})
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    scan, _, used = _scanned(args, tokenizer)
    kept = save_trimmed(model, tokenizer, args.out, used_ids=used, counts=scan.counts, min_count=args.min_count,
                        max_vocab=args.max_vocab, overwrite=args.overwrite)
    files = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    return {"model": args.model, "out": str(args.out), "model_class": type(model).__name__,
            "vocab_size": model.get_input_embeddings().num_embeddings, "num_used": used.numel(),
            "num_kept": kept.numel(), "tokens": int(scan.counts.sum()), "bytes_written": files}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _id_chunks(args, tokenizer):
    """[n] id tensors: a text at a time (tokenized), or the id columns' rows as they are."""
    from tqdm.auto import tqdm

    rows = [row for path in args.data for row in _records(path, args.text_column)]
    for row in tqdm(rows, desc="scanning", unit="row", disable=args.quiet):
        if args.columns:
            for column in args.columns:
                if column not in row:
                    raise PemaError(f"a row of the data has no column {column!r} (it has {sorted(row)})")
                yield torch.as_tensor(row[column], dtype=torch.long).reshape(-1)
            continue
        if args.chat_template:
            if "messages" not in row:
                raise PemaError(f"--chat-template needs a 'messages' column, got {sorted(row)}")
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)  # the template writes its specials
            yield torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            continue
        if args.text_column not in row:
            raise PemaError(f"a row of the data has no column {args.text_column!r} (it has {sorted(row)}); name the "
                            f"text with --text-column or the id columns with --columns")
        yield torch.as_tensor(tokenizer(row[args.text_column])["input_ids"], dtype=torch.long)


def _records(path: Path, text_column: str):
    """The rows of one data file or saved datasets folder, as dicts."""
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
        return [row for split in splits for row in split]
    if not path.is_file():
        raise PemaError(f"{path} is no file or folder")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{text_column: line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if suffix in (".csv", ".parquet"):
        import pandas

        frame = pandas.read_csv(path) if suffix == ".csv" else pandas.read_parquet(path)
        return frame.to_dict("records")
    raise PemaError(f"{path}: unknown data format {suffix!r} (.txt, .jsonl, .csv, .parquet or a datasets folder)")


def _text(report: dict) -> str:
    if "num_kept" in report:
        return (f"{report['model']} -> {report['out']}: {report['model_class']} with V = {report['vocab_size']:,} "
                f"trimmed to K = {report['num_kept']:,} ids ({report['num_used']:,} used over {report['tokens']:,} "
                f"tokens), {report['bytes_written'] / 2**20:,.1f} MiB written")
    lines = [f"{report['model']}: V = {report['vocab_size']:,}, U = {report['num_used']:,} used "
             f"({report['share_used']:.1%}) over {report['tokens']:,} tokens",
             "most frequent: " + ", ".join(f"{t['token']!r} ({t['count']:,})" for t in report["most_frequent"])]
    if report["estimate"] is None:
        return "\n".join([*lines, report["estimate_note"]])
    lines.append(f"training state ({report['estimate_dtype']}), GiB: weights + gradients + optimizer + logits = total")
    for mode, sizes in report["estimate"].items():
        parts = " + ".join(f"{sizes[k] / 2**30:.3f}" for k in ("weights", "gradients", "optimizer", "logits"))
        lines.append(f"  {mode:<17} {parts} = {sizes['total'] / 2**30:.3f}")
    return "\n".join(lines)
