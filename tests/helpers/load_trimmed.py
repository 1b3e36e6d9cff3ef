"""Loads `save_trimmed` directories the way a deployment would: plain transformers, pema_triton not importable.

Run as `python -I load_trimmed.py job.json out.pt` from a folder outside the repository (the slow tier), or import
`load` to run the same code in the test's own process (the fast tier: a subprocess costs ~4 s of imports). The job
is a list of {"dir", "auto_class", "texts", optional "max_length", optional "generate": max_new_tokens}; for each
directory it writes the tokenizer's ids of every text, the model's output on them (hidden states or logits) and, if
asked, greedy `generate` ids.
"""

import json
import sys

import torch
import transformers


def _run(entry: dict) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(entry["dir"])
    model = getattr(transformers, entry["auto_class"]).from_pretrained(entry["dir"], dtype=torch.float32).eval()
    max_length = entry.get("max_length", 64)
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in entry["texts"]]
    outputs = []
    with torch.no_grad():
        for row in ids:
            batch = torch.tensor([row])
            kwargs = {"decoder_input_ids": batch} if model.config.is_encoder_decoder else {}
            out = model(input_ids=batch, **kwargs)
            outputs.append(out.logits[0] if hasattr(out, "logits") else out.last_hidden_state[0])
        generated = None
        if entry.get("generate"):
            prompt = torch.tensor([ids[0][:8]])
            generated = model.generate(prompt, max_new_tokens=entry["generate"], do_sample=False)[0].tolist()
    return {"ids": ids, "outputs": outputs, "generated": generated, "vocab_size": model.config.vocab_size,
            "len_tokenizer": len(tokenizer), "tokenizer_class": type(tokenizer).__name__}


def load(job: list[dict]) -> list[dict]:
    """The results of every entry of `job`, in this process."""
    return [_run(entry) for entry in job]


def main(job_path: str, out_path: str) -> None:
    try:
        import pema_triton  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("pema_triton is importable in the loading process")
    with open(job_path) as f:
        job = json.load(f)
    torch.save(load(job), out_path)


if __name__ == "__main__":
    sys.modules["pema_triton"] = None  # `import pema_triton` raises ImportError from here on, installed or not
    main(*sys.argv[1:3])
