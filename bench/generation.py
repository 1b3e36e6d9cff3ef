"""Greedy generation on the CPU with a model `save_trimmed` cut to the ids of its text, against the full model.

Two models, each trimmed to the token ids (and the special ids) its own tokenizer gives all 2,225 BBC News
articles: the real SmolLM2-135M-Instruct (V = 49,152), and a Qwen 2.5-0.5B-shaped model (V = 151,936, 24 layers,
tied embeddings) with random weights (seed 0) and Qwen 2.5's real tokenizer. The full model is written by
`save_pretrained` (model and tokenizer), the trimmed one by `save_trimmed`, and each directory is loaded with plain
`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)` in a fresh process where `import pema_triton` fails
(2 torch threads), which then times greedy `generate` on the first 32 tokens of 4 BBC articles, batch 1, and reports
its peak RSS. The full model's process also generates with its logits masked to the kept ids: the trimmed model's
output, mapped back through the kept ids, must equal that exactly.

    python bench/generation.py          # ~7 minutes on 2 otherwise idle CPU cores
Writes bench/results/generation_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MIB = 2**20
_quoted = partial(json.dumps, ensure_ascii=False)  # a generated piece, as the notes show it
MODELS = ("SmolLM2-135M-Instruct", "Qwen2.5-0.5B shape, random weights")
SETTINGS = {"prompts": 4, "prompt_tokens": 32, "new_tokens": 48, "repeats": 3, "threads": 2}

# One variant (full or trimmed) in a fresh process: plain transformers, pema_triton blocked. Arguments: the job and
# the result file; each stdin line "N" times one round of N new tokens per prompt, "0" ends (see run_pair).
_GENERATE = r"""
import json, os, sys, time
sys.modules["pema_triton"] = None  # the trimmed directory must run without this project
import torch, transformers

job = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(job["threads"])
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
load = round(os.getloadavg()[0], 2)


def rss(field):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field)).split()[1]) * 1024


def keep_only(kept, vocab_size):  # a logits processor: generate picks only the kept ids
    blocked = torch.ones(vocab_size, dtype=torch.bool).index_fill_(0, kept, False)
    return lambda input_ids, scores: scores.masked_fill(blocked, float("-inf"))


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = rss("VmRSS")
model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"])
prompts = [tokenizer(text)["input_ids"][:job["prompt_tokens"]] for text in job["texts"]]


def generate(ids, n, processors=()):
    ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, logits_processor=transformers.LogitsProcessorList(processors))
    return out[0, ids.shape[1]:].tolist()


def timed(n):  # ([seconds per prompt], [new ids per prompt])
    spans = [(time.perf_counter(), generate(ids, n), time.perf_counter()) for ids in prompts]
    return [end - begin for begin, _, end in spans], [out for _, out, _ in spans]


generate(prompts[0], job["new_tokens"])  # warm-up
runs = {}  # new tokens -> [(seconds, outputs) per prompt] per round; the parent says when ("N"), "0" ends
print("ready", flush=True)
for line in sys.stdin:
    if int(line) == 0:
        break
    runs.setdefault(int(line), []).append(timed(int(line)))
    print("done", flush=True)
gen = runs[job["new_tokens"]]
result = {
    "prompt_ids": prompts, "generated": gen[0][1], "deterministic": all(r[1] == gen[0][1] for r in gen),
    "pieces": [[tokenizer.decode([i]) for i in out] for out in gen[0][1]],  # each new token's text
    "generate_s": [r[0] for r in gen], "first_token_s": [r[0] for r in runs[1]],
    "peak_rss_bytes": rss("VmHWM") - start,
    "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    "vocab_size": model.config.vocab_size, "len_tokenizer": len(tokenizer), "threads": torch.get_num_threads(),
    "load_average_1min": [load, round(os.getloadavg()[0], 2)],  # at the start and the end of the timed runs
}
if job.get("kept") is not None:
    keep = keep_only(torch.tensor(job["kept"]), model.config.vocab_size)
    result["constrained"] = [generate(ids, job["new_tokens"], [keep]) for ids in prompts]
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
"""


def _assets():
    """examples/assets.py, imported without leaving examples/ on sys.path (the tests import this module)."""
    sys.path.insert(0, str(BENCH.parent / "examples"))
    try:
        import assets
    finally:
        sys.path.pop(0)
    return assets


def _smollm2():
    import transformers

    folder, gguf = _assets().smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.is_quantized, model.hf_quantizer = False, None  # de-quantised to fp32 on load
    del model.config.quantization_config  # else save_pretrained writes a GGUF flag the folder's weights do not fit
    return tokenizer, model.eval()


def _qwen():
    import transformers

    tokenizer = _assets().load_tokenizer("qwen2.5-0.5b")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.generation_config.update(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    return tokenizer, model


def scan(tokenizer, texts):
    """(used ids with the special ids, tokens scanned): `VocabularyScan` over every text's tokens."""
    from pema_triton import VocabularyScan, special_token_ids

    vocab = VocabularyScan(len(tokenizer), count=True)
    for i in range(0, len(texts), 256):
        vocab.update(torch.tensor([t for row in tokenizer(texts[i:i + 256])["input_ids"] for t in row]))
    return vocab.used_ids(keep=special_token_ids(tokenizer)), int(vocab.counts.sum())


def prepare(name: str, texts, root: Path) -> dict:
    """Writes `name` full and trimmed under `root`; returns the row's facts and both directories."""
    from pema_triton import save_trimmed

    start = time.perf_counter()
    tokenizer, model = _smollm2() if name == MODELS[0] else _qwen()
    used, num_tokens = scan(tokenizer, texts)
    full, trimmed = root / f"{name[:4]}-full", root / f"{name[:4]}-trimmed"
    kept = save_trimmed(model, tokenizer, trimmed, used_ids=used)
    model.save_pretrained(full)
    tokenizer.save_pretrained(full)
    reference = [tokenizer(t)["input_ids"][:SETTINGS["prompt_tokens"]] for t in texts[:SETTINGS["prompts"]]]
    row = {"model": name, "V": model.config.vocab_size, "len_tokenizer": len(tokenizer), "U": len(used),
           "K": len(kept), "tokens_scanned": num_tokens, "kept": kept.tolist(), "reference_prompt_ids": reference,
           **{f"files_{d.name.split('-')[-1]}": sum(f.stat().st_size for f in d.glob("*.safetensors"))
              for d in (full, trimmed)},
           "prepare_s": time.perf_counter() - start}
    return row | {"dirs": (full, trimmed)}


def _ask(process, say: str | None, expect: str | None = "done") -> None:
    if say is not None:
        process.stdin.write(say + "\n")
        process.stdin.flush()
    if expect is not None and process.stdout.readline().strip() != expect:
        raise RuntimeError(f"the generation process stopped (exit code {process.wait()}); its error is above")


def run_pair(folders: tuple[Path, Path], texts, kept: list[int]) -> tuple[dict, dict]:
    """`_GENERATE` on the full and the trimmed directory, each in a fresh `python -I` process outside the
    repository; their timed rounds alternate (the order swapped each repeat), so a load that comes and goes on
    this shared machine falls on both alike. The full model's process also generates with its logits masked."""
    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
        processes = []
        for name, folder, keep in (("full", folders[0], kept), ("trimmed", folders[1], None)):
            job = Path(work) / f"{name}.json"
            job.write_text(json.dumps(SETTINGS | {"dir": str(folder), "texts": texts, "kept": keep}))
            processes.append(subprocess.Popen([sys.executable, "-I", "-c", _GENERATE, str(job), f"{job}.out"],
                                              cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              text=True))
        try:
            for process in processes:
                _ask(process, None, "ready")
            for repeat in range(SETTINGS["repeats"]):
                for n in (SETTINGS["new_tokens"], 1):
                    for process in processes[::1 if repeat % 2 == 0 else -1]:
                        _ask(process, str(n))
            for process in processes:
                _ask(process, "0", None)
            if any(process.wait() for process in processes):
                raise RuntimeError("a generation process failed; its error is above")
        finally:
            for process in (p for p in processes if p.poll() is None):
                process.kill()
        return tuple(json.loads(Path(f"{work}/{name}.json.out").read_text()) for name in ("full", "trimmed"))


def compare(row: dict, full: dict, trimmed: dict) -> dict:
    """The exactness facts: same prompt tokens, trimmed = full constrained, trimmed = full unconstrained."""
    kept = torch.tensor(row["kept"])
    back = [kept[torch.tensor(ids)].tolist() for ids in trimmed["generated"]]
    prompts_back = [kept[torch.tensor(ids)].tolist() for ids in trimmed["prompt_ids"]]
    common = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
              for a, b in zip(back, full["generated"], strict=True)]
    return {
        "same_prompt_tokens": prompts_back == full["prompt_ids"] == row["reference_prompt_ids"],
        "constrained_identical": sum(a == b for a, b in zip(back, full["constrained"], strict=True)),
        "unconstrained_identical": sum(a == b for a, b in zip(back, full["generated"], strict=True)),
        "unconstrained_common_prefix": common,  # and the pieces each model writes where they part:
        "parted_at": [[n, f[n], t[n]] for n, f, t in zip(common, full["pieces"], trimmed["pieces"]) if n < len(f)],
        "full_unconstrained_within_kept": sum(set(g) <= set(row["kept"]) for g in full["generated"]),
        "trimmed_generated_as_full_ids": back,
    }


def summary(variant: dict) -> dict:
    """Per prompt the median over the repeats; tokens/s = all new tokens / the summed medians; ms/token = one
    decoding step after the first token: (median generate - median first token) / (new tokens - 1)."""
    new = SETTINGS["new_tokens"]
    gen = [statistics.median(times) for times in zip(*variant["generate_s"])]
    first = [statistics.median(times) for times in zip(*variant["first_token_s"])]
    return {"tokens_per_s": new * len(gen) / sum(gen), "first_token_ms": 1e3 * statistics.mean(first),
            "ms_per_token": 1e3 * (sum(gen) - sum(first)) / (len(gen) * (new - 1))}


def measure(name: str, texts, root: Path) -> dict:
    row = prepare(name, texts, root)
    gc.collect()  # the model written: only the generation processes hold weights now
    full, trimmed = run_pair(row.pop("dirs"), texts[:SETTINGS["prompts"]], row["kept"])
    row |= {"full": full | summary(full), "trimmed": trimmed | summary(trimmed)} | compare(row, full, trimmed)
    del row["kept"]  # K ids: the JSON keeps the generated ids, mapped back, instead
    print({k: v for k, v in row.items() if k not in ("full", "trimmed", "trimmed_generated_as_full_ids")}, flush=True)
    return row


def _pair(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return f"{row['full'][key] / scale:{fmt}} -> {row['trimmed'][key] / scale:{fmt}}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | V | U | K (K/V) | params full -> trimmed | files | peak RSS | tokens/s (ratio) | "
             "ms per token | time to first token | greedy identical, constrained | unconstrained |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, full, trimmed = len(r["full"]["generated"]), r["full"], r["trimmed"]
        lines.append(
            f"| {r['model']} | {r['V']:,} | {r['U']:,} | {r['K']:,} ({r['K'] / r['V']:.1%}) | "
            f"{_pair(r, 'param_bytes', ',.0f', MIB)} MiB | {r['files_full'] / MIB:,.0f} -> "
            f"{r['files_trimmed'] / MIB:,.0f} MiB | {_pair(r, 'peak_rss_bytes', ',.0f', MIB)} MiB | "
            f"{_pair(r, 'tokens_per_s', '.1f')} ({trimmed['tokens_per_s'] / full['tokens_per_s']:.2f}x) | "
            f"{_pair(r, 'ms_per_token', '.1f')} | {_pair(r, 'first_token_ms', ',.0f')} ms | "
            f"{r['constrained_identical']}/{p} | {r['unconstrained_identical']}/{p} (common prefix "
            f"{', '.join(map(str, r['unconstrained_common_prefix']))}) |")
    return lines


def _per_model(rows: list[dict], say) -> str:
    return "; ".join(f"{r['model'].split()[0]} {say(r)}" for r in rows)


def render(result: dict) -> str:
    env, s, rows = result["environment"], result["settings"], result["rows"]
    inside = _per_model(rows, lambda r: f"{r['full_unconstrained_within_kept']}/{s['prompts']} prompts")
    parted = _per_model(rows, lambda r: ", ".join(f"{_quoted(f)} ({_quoted(t)})" for _, f, t in r["parted_at"]) or "-")
    return "\n".join([
        "# Greedy generation: full vs save_trimmed, on the CPU", "",
        f"Generated by `python bench/generation.py` (torch {env['torch']}, transformers {env['transformers']}, "
        f"commit {env['git_commit']}; {env['device']}, {s['threads']} torch threads per process, load average "
        f"{env['load_average_1min']} when the run started). Each model is trimmed to the ids its tokenizer gives all "
        f"of BBC News ({result['articles']:,} articles) plus its special ids; U: those ids, K: what save_trimmed keeps "
        "(U + the 256 byte tokens + the merge closure). Every a -> b is full -> trimmed.", "",
        *table(rows), "",
        f"- Method: each directory (full: `save_pretrained` of the model and tokenizer; trimmed: `save_trimmed`) is "
        f"loaded by `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)` in a fresh `python -I` process "
        f"where `import pema_triton` fails. Prompts: the first {s['prompt_tokens']} tokens of {s['prompts']} of the "
        f"scanned articles, tokenized by that directory's own tokenizer; after one warm-up, greedy `generate` with "
        f"exactly {s['new_tokens']} new tokens per prompt, batch 1, {s['repeats']} times; per prompt the median. The "
        "full and the trimmed process run side by side and take turns, one round each (all prompts), the order "
        "swapped every repeat, so a load that comes and goes falls on both alike.",
        f"- tokens/s: all new tokens over the summed medians. ms per token: one decoding step after the first "
        f"((generate - time to first token) / {s['new_tokens'] - 1}). Time to first token: a `generate` of one new "
        "token (the prompt's forward pass), the mean over the prompts of their medians.",
        "- params: the loaded model's parameter bytes (the tied head counted once); files: its safetensors; peak RSS: "
        "Linux VmHWM of the process (its own) from after its imports to the end of the timed runs (load, tokenizer, "
        "generate).",
        "- Greedy identical, constrained: prompts whose trimmed output, mapped back through the kept ids, equals the "
        "full model's greedy output with its logits masked to the kept ids (a logits processor setting -inf "
        "elsewhere): the trimmed model computes the same logits on the kept ids, so this must be every prompt.",
        "- Unconstrained: prompts whose trimmed output equals the full model's plain greedy output, and the number of "
        "leading new tokens they share. They part where the full model picks an id outside K, which the trimmed model "
        "cannot produce: it writes another piece there and goes on from its own text. The full model's plain output "
        f"stayed inside K on: {inside}. Where they part, the full model's piece (the trimmed model's): {parted}.",
        "- The Qwen-shaped model's random weights know no language: its greedy pick is in effect a random id of all "
        "151,936, in K with a chance of about K/V, so its outputs part at once; only a trained model on text like its "
        "scan (SmolLM2 here) says what users would see.",
        "- Prompt tokens under the trimmed tokenizer, mapped back, vs the full one's; repeats giving the same ids: "
        + _per_model(rows, lambda r: f"{'the same' if r['same_prompt_tokens'] else 'NOT the same'}, "
                     f"{'' if r['full']['deterministic'] and r['trimmed']['deterministic'] else 'NOT '}deterministic")
        + ".",
        "- The machine's 2 cores are shared: the 1-minute load average at the start and the end of the timed runs "
        "was " + _per_model(rows, lambda r: " -> ".join(map(str, r["full"]["load_average_1min"])))
        + " (the timed process itself makes up to 2; above that, other processes had the cores too).", "",
    ])


def main(argv=None):
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the GGUF loader's bar reads it then
    import harness
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=range(len(MODELS)), type=int, default=list(range(len(MODELS))),
                        help="0: SmolLM2, 1: the Qwen 2.5-shaped model")
    parser.add_argument("--new-tokens", type=int, default=SETTINGS["new_tokens"])
    parser.add_argument("--repeats", type=int, default=SETTINGS["repeats"])
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    SETTINGS.update(new_tokens=args.new_tokens, repeats=args.repeats)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    env = harness.environment() | {"transformers": transformers.__version__}
    start = time.perf_counter()
    (texts, _), _, _ = _assets().load_bbc_news(2225, 0)
    with tempfile.TemporaryDirectory() as root:
        rows = [measure(MODELS[i], texts, Path(root)) for i in args.models]
    result = {"environment": env, "settings": dict(SETTINGS), "articles": len(texts), "rows": rows,
              "seconds": time.perf_counter() - start}
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    (out / "generation_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "generation_cpu.md").write_text(render(result))
    print(f"{render(result)}\n{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
