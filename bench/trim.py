"""What `save_trimmed` keeps and saves, on real tokenizers, real models and real text.

Tokenizers (MiniLM's WordPiece; GPT-2, SmolLM2, Llama 3, Qwen 2.5 and GLM-4 byte-level BPE) on BBC News and the
tweets: V, the used ids U (with the special tokens), the kept ids K (U + single characters / byte tokens + the merge
closure), and the share of the corpus's texts that re-encode to exactly the same tokens under three kept sets:
save_trimmed's; the used ids alone (no closure, no fallback); and vocabtrimmer's rule (tokens seen at least twice,
plus the special tokens: `vocab_miner(min_frequency=2)`), applied with this project's tokenizer editing, because
the vocabtrimmer package itself does not import with transformers 5 (see the table's note).

Models (all-MiniLM-L6-v2, SmolLM2-135M): the model directory written full-size and trimmed to each corpus, its
files' size, and the peak RSS that loading it with plain `from_pretrained` and reading every weight once adds (in a
fresh process; the weights are memory-mapped, so loading alone pages in little of them).

    python bench/trim.py            # ~5 minutes on 2 CPU cores
Writes bench/results/trim.{json,md}.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "examples"), str(Path(__file__).resolve().parent)]
import assets  # noqa: E402
import harness  # noqa: E402

from pema_triton import save_trimmed, special_token_ids  # noqa: E402
from pema_triton.tokenizer_trim import TokenizerJson, kept_token_ids, trimmed_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOKENIZERS = ["bert (MiniLM)", "gpt2", "smollm2-135m", "llama-3-8b", "qwen2.5-0.5b", "glm-4-9b"]
MIB = 2**20

_LOAD = """
import sys, time
sys.modules["pema_triton"] = None
import torch, transformers
def rss(field):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start, t = rss("VmRSS"), time.perf_counter()
model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1], dtype=torch.float32)
seconds = time.perf_counter() - t
# safetensors weights are memory-mapped and paged in when first read: read every one, as the first forward would.
with torch.no_grad():
    for p in model.state_dict().values():
        p.sum()
print(rss("VmHWM") - start, seconds)
"""


def corpora(limit: int | None = None) -> dict[str, list[str]]:
    (bbc, _), _, _ = assets.load_bbc_news(2225, 0)
    tweets = assets.load_tweets()
    bbc, tweets = bbc[:limit], tweets[:limit]
    return {f"BBC News ({len(bbc):,} articles)": bbc, f"tweets ({len(tweets):,})": tweets}


def _untruncated(tokenizer_json: str):
    """A `tokenizers.Tokenizer` from `tokenizer_json` that encodes whole texts (MiniLM's truncates at 128 tokens)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_truncation()
    backend.no_padding()
    return backend


def _encode(backend, texts) -> list[list[int]]:
    return [e.ids for e in backend.encode_batch(texts)]


def same_share(tokenizer, kept: list[int], texts, original) -> float:
    """Share of `texts` whose tokens under the tokenizer trimmed to `kept` map back (through kept) to `original`."""
    trimmed = _untruncated(json.dumps(trimmed_json(TokenizerJson(tokenizer), kept)))
    back = torch.tensor(kept)
    same = sum(back[torch.tensor(new, dtype=torch.long)].tolist() == old
               for new, old in zip(_encode(trimmed, texts), original))
    return same / len(texts)


def tokenizer_rows(texts_by_corpus) -> list[dict]:
    rows = []
    for name in TOKENIZERS:
        tokenizer = assets.load_tokenizer(name)
        backend = _untruncated(tokenizer.backend_tokenizer.to_str())
        for corpus, texts in texts_by_corpus.items():
            start = time.perf_counter()
            original = _encode(backend, texts)
            counts = Counter(i for row in original for i in row)
            special = set(special_token_ids(tokenizer))
            used = sorted(set(counts) | special)
            kept = kept_token_ids(tokenizer, used)
            vocabtrimmer = sorted({i for i, c in counts.items() if c >= 2} | special)
            rows.append({
                "tokenizer": name, "corpus": corpus, "V": len(tokenizer), "U": len(used), "K": len(kept),
                "same_trimmed": same_share(tokenizer, kept, texts, original),
                "same_used_only": same_share(tokenizer, used, texts, original),
                "K_vocabtrimmer": len(vocabtrimmer),
                "same_vocabtrimmer": same_share(tokenizer, vocabtrimmer, texts, original),
                "seconds": time.perf_counter() - start,
            })
            print(rows[-1], flush=True)
    return rows


def _dir_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def _load_cost(folder, auto_class) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-I", "-c", _LOAD, str(folder), auto_class], check=True, text=True,
                         capture_output=True, cwd=tempfile.gettempdir()).stdout.split()
    return int(out[0]), float(out[1])


def _models():
    import transformers

    minilm = transformers.AutoModel.from_pretrained(assets.minilm_dir()).eval()
    yield "all-MiniLM-L6-v2", "AutoModel", minilm, assets.load_tokenizer("bert (MiniLM)")
    folder, gguf = assets.smollm2_dir()
    smol = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    yield "SmolLM2-135M", "AutoModelForCausalLM", smol, assets.load_tokenizer("smollm2-135m")


def model_rows(texts_by_corpus, root: Path) -> list[dict]:
    rows = []
    for name, auto_class, model, tokenizer in _models():
        vocab = model.get_input_embeddings().num_embeddings
        full = root / f"{name}-full"
        save_trimmed(model, tokenizer, full, used_ids=torch.arange(vocab))  # K = V: the full model, same writer
        full_rss, full_s = _load_cost(full, auto_class)
        for corpus, texts in texts_by_corpus.items():
            used = sorted({i for row in _encode(_untruncated(tokenizer.backend_tokenizer.to_str()), texts) for i in row}
                          | set(special_token_ids(tokenizer)))
            folder = root / f"{name}-{corpus.split()[0]}"
            kept = save_trimmed(model, tokenizer, folder, used_ids=used)
            rss, seconds = _load_cost(folder, auto_class)
            rows.append({"model": name, "corpus": corpus, "V": vocab, "U": len(used), "K": len(kept),
                         "files_full": _dir_bytes(full), "files_trimmed": _dir_bytes(folder),
                         "load_rss_full": full_rss, "load_rss_trimmed": rss,
                         "load_s_full": full_s, "load_s_trimmed": seconds})
            print(rows[-1], flush=True)
        del model
    return rows


def vocabtrimmer_status() -> str:
    out = subprocess.run([sys.executable, "-c", "import vocabtrimmer"], text=True, capture_output=True)
    if out.returncode == 0:
        return "imports"
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return f"`import vocabtrimmer` fails: {re.sub(r' [(]/[^)]*[)]', '', last)}"  # without this machine's paths


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(tok_rows, mod_rows, status: str, env: dict) -> str:
    lines = ["# save_trimmed on real tokenizers, models and text", "",
             f"Generated by `python bench/trim.py` (torch {env['torch']}, transformers {env['transformers']}, "
             f"commit {env['git_commit']}). U: used ids (with the special tokens); K: ids save_trimmed keeps "
             "(U + every single-character piece for WordPiece, the 256 byte tokens + the merge closure for "
             "byte-level BPE). \"same tokens\": share of the corpus's texts that re-encode to exactly the original "
             "tokens under the tokenizer trimmed to that kept set.", "",
             "| tokenizer | corpus | V | U | K (K/V) | same tokens: save_trimmed | used ids only | "
             "vocabtrimmer rule: K | same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in tok_rows:
        lines.append(f"| {r['tokenizer']} | {r['corpus']} | {r['V']:,} | {r['U']:,} | {r['K']:,} "
                     f"({_pct(r['K'] / r['V'])}) | {_pct(r['same_trimmed'])} | {_pct(r['same_used_only'])} | "
                     f"{r['K_vocabtrimmer']:,} | {_pct(r['same_vocabtrimmer'])} |")
    lines += ["", f"vocabtrimmer 0.0.2 (the PyPI release): {status}. Its rule (keep the tokens a corpus uses at least "
              "`min_frequency=2` times, plus the special tokens; no closure, no fallback) is applied here with this "
              "project's tokenizer editing so the kept sets compare on the same text.", "",
              "| model | corpus | V | U | K | files full -> trimmed | peak RSS loading full -> trimmed | "
              "load time full -> trimmed |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in mod_rows:
        lines.append(f"| {r['model']} | {r['corpus']} | {r['V']:,} | {r['U']:,} | {r['K']:,} | "
                     f"{r['files_full'] / MIB:,.1f} -> {r['files_trimmed'] / MIB:,.1f} MiB | "
                     f"{r['load_rss_full'] / MIB:,.0f} -> {r['load_rss_trimmed'] / MIB:,.0f} MiB | "
                     f"{r['load_s_full']:.2f} -> {r['load_s_trimmed']:.2f} s |")
    lines += ["", "Files: the directory `save_trimmed` writes (fp32 safetensors, config, tokenizer); \"full\" is the "
              "same writer with every id kept. Peak RSS: what `from_pretrained(dir, dtype=float32)` and reading every "
              "weight once add in a fresh process (Linux VmHWM, reset after the imports; safetensors are "
              "memory-mapped, so without the read little of the weights is resident). vocabtrimmer has no causal-LM "
              "or plain-encoder model "
              "class (it takes *ForMaskedLM / *ForSequenceClassification / *ForTokenClassification, mT5, mBART), so "
              "it has no model row even where it imports."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import argparse

    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N texts of each corpus (a quick check)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")
    texts = corpora(args.limit)
    tok_rows = tokenizer_rows(texts)
    with tempfile.TemporaryDirectory() as root:
        mod_rows = model_rows(texts, Path(root))
    status = vocabtrimmer_status()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = harness.environment() | {"transformers": transformers.__version__}
    (out / "trim.json").write_text(json.dumps({"environment": env, "tokenizers": tok_rows, "models": mod_rows,
                                                   "vocabtrimmer": status}, indent=2) + "\n")
    (out / "trim.md").write_text(markdown(tok_rows, mod_rows, status, env))
    print(markdown(tok_rows, mod_rows, status, env))


if __name__ == "__main__":
    main()
