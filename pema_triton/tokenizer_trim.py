"""The tokenizer side of :func:`pema_triton.save_trimmed`: a fast tokenizer cut down to the kept token ids.

Works on the tokenizer's `tokenizer.json` (its `tokenizers` backend): the model's vocabulary (WordPiece, BPE with its
merges, or Unigram pieces) keeps only the kept tokens, renumbered in the kept order (new id i is original id
`kept[i]`), and the added tokens, the post-processor's special-token ids and the padding id follow.

Which tokens must stay so that the texts behind the used ids tokenize exactly as before (:func:`kept_token_ids`):

- WordPiece tokenizes a word greedily, longest piece first. Dropping pieces no word used cannot change a used
  word's pieces (each was the longest match, and it is still there). Every single-character piece (`a`, `##a`)
  stays too, so an unseen word falls back to characters rather than `[UNK]` where the original could spell it.
- BPE applies, at each step, the lowest-ranked merge among adjacent pairs. If every merge that built a kept token
  stays (the merge closure: the parts of a kept token, their parts, ...), the same merge wins at every step on a
  used word, so it ends in the same tokens. Merges whose result is dropped are removed, so no text can produce a
  dropped token. With the base alphabet kept (the 256 byte tokens of byte-level BPE, or the `<0xNN>` pieces of
  byte fallback), any text still encodes to kept ids and decodes back to itself.
- Unigram picks the segmentation of highest score; the kept pieces are a subset holding the used segmentation, so
  it still wins. The byte-fallback pieces (else every single-character piece) stay for unseen text.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from .errors import UnsupportedModuleError

__all__ = ["TokenizerJson", "kept_token_ids", "write_trimmed_tokenizer"]

SUPPORTED = ("WordPiece", "BPE", "Unigram")
# Files of the slow (Python) tokenizers: after trimming they describe the old vocabulary, so they are not written.
_SLOW_FILES = ("vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
               "tokenizer.model", "sentencepiece.model")


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE (GPT-2) writes bytes as."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return set(chars)


def _has_component(node, kind: str) -> bool:
    """Whether a pre-tokenizer / decoder tree (dicts, `Sequence`s) holds a component of type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_component(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_component(v, kind) for v in node)
    return False


def _merge_pair(merge) -> tuple[str, str]:
    """A merge as stored in tokenizer.json: `["a", "b"]` (tokenizers >= 0.20) or `"a b"`."""
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


class TokenizerJson:
    """A fast tokenizer's `tokenizer.json`, parsed: its model, its id <-> token maps (added tokens included)."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UnsupportedModuleError(
                f"{type(tokenizer).__name__} is a slow (Python) tokenizer; save_trimmed edits a fast tokenizer's "
                f"tokenizer.json: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.data = json.loads(backend.to_str())
        self.model = self.data["model"]
        self.kind = self.model.get("type")
        if self.kind not in SUPPORTED:
            raise UnsupportedModuleError(
                f"cannot trim a {self.kind} tokenizer ({type(tokenizer).__name__}); save_trimmed supports "
                f"{', '.join(SUPPORTED)} tokenizers")
        if self.kind == "Unigram":
            self.token_to_id = {piece: i for i, (piece, _) in enumerate(self.model["vocab"])}
        else:
            self.token_to_id = dict(self.model["vocab"])
        for added in self.data.get("added_tokens", []):
            self.token_to_id.setdefault(added["content"], added["id"])
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}

    def ids_of(self, tokens: Iterable[str]) -> set[int]:
        return {self.token_to_id[t] for t in tokens if t in self.token_to_id}

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens and of the tokens the post-processor inserts."""
        ids = {a["id"] for a in self.data.get("added_tokens", []) if a.get("special")}
        return ids | set(_processor_ids(self.data.get("post_processor")))

    def fallback_ids(self) -> set[int]:
        """Tokens unseen text falls back to (see the module docstring)."""
        vocab = self.token_to_id
        if self.model.get("byte_fallback"):
            return self.ids_of(f"<0x{b:02X}>" for b in range(256))
        if self.kind == "BPE" and _has_component(self.data.get("pre_tokenizer"), "ByteLevel"):
            return self.ids_of(_byte_level_alphabet())
        prefix = self.model.get("continuing_subword_prefix") or ""
        singles = {t for t in vocab if len(t) == 1 or (prefix and t.startswith(prefix) and len(t) == len(prefix) + 1)}
        return self.ids_of(singles)

    def unk_ids(self) -> set[int]:
        if self.kind == "Unigram":
            unk = self.model.get("unk_id")
            return {unk} if unk is not None else set()
        return self.ids_of([self.model["unk_token"]] if self.model.get("unk_token") else [])

    def merge_result(self, left: str, right: str) -> str:
        prefix = self.model.get("continuing_subword_prefix") or ""
        return left + (right[len(prefix):] if prefix and right.startswith(prefix) else right)

    @functools.cached_property
    def _producers(self) -> dict[str, list[tuple[str, str]]]:
        """Each BPE merge result -> the (left, right) pairs that produce it."""
        producers: dict[str, list[tuple[str, str]]] = {}
        for merge in self.model.get("merges", []):
            left, right = _merge_pair(merge)
            producers.setdefault(self.merge_result(left, right), []).append((left, right))
        return producers

    def merge_closure(self, ids: set[int]) -> set[int]:
        """`ids` and every token a merge building one of them from its parts needs, recursively (BPE only)."""
        if self.kind != "BPE":
            return set(ids)
        producers = self._producers
        kept, todo = set(ids), [self.id_to_token[i] for i in ids if i in self.id_to_token]
        while todo:
            for left, right in producers.get(todo.pop(), ()):
                for part in (left, right):
                    part_id = self.token_to_id.get(part)
                    if part_id is not None and part_id not in kept:
                        kept.add(part_id)
                        todo.append(part)
        return kept


def _processor_ids(node) -> list[int]:
    """Every token id a post-processor tree names (TemplateProcessing, Bert/Roberta processing, Sequence)."""
    ids = []
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "TemplateProcessing":
            for spec in node.get("special_tokens", {}).values():
                ids.extend(spec.get("ids", []))
        elif kind in ("BertProcessing", "RobertaProcessing"):
            ids.extend(pair[1] for pair in (node.get("sep"), node.get("cls")) if pair)
        for child in node.get("processors") or []:
            ids.extend(_processor_ids(child))
    return ids


def kept_token_ids(tokenizer, used_ids: Iterable[int], extra: Iterable[int] = ()) -> list[int]:
    """Sorted ids a trimmed tokenizer keeps: `used_ids`, `extra` (say, the model config's special ids), the
    tokenizer's special tokens, its unknown token, its fallback tokens and, for BPE, the merge closure.

    `tokenizer` may be a :class:`TokenizerJson` already parsed (calls that try several id sets parse once).

    Raises:
        UnsupportedModuleError: a slow tokenizer, or a tokenizer model other than WordPiece, BPE or Unigram.
    """
    parsed = tokenizer if isinstance(tokenizer, TokenizerJson) else TokenizerJson(tokenizer)
    ids = {int(i) for i in used_ids} | {int(i) for i in extra}
    ids |= parsed.special_ids() | parsed.unk_ids() | parsed.fallback_ids()
    return sorted(parsed.merge_closure(ids))


def trimmed_json(parsed: TokenizerJson, kept: list[int]) -> dict:
    """`parsed`'s tokenizer.json with only the `kept` ids, renumbered: new id i is original id `kept[i]`."""
    new_id = {old: new for new, old in enumerate(kept)}
    data, model = json.loads(json.dumps(parsed.data)), parsed.data["model"]
    out = data["model"]
    if parsed.kind == "Unigram":
        out["vocab"] = [entry for i, entry in enumerate(model["vocab"]) if i in new_id]
        if model.get("unk_id") is not None:
            out["unk_id"] = new_id[model["unk_id"]]
    else:
        out["vocab"] = {tok: new_id[i] for tok, i in model["vocab"].items() if i in new_id}
    if parsed.kind == "BPE":
        vocab = out["vocab"]
        out["merges"] = [m for m in model.get("merges", []) if all(p in vocab for p in _merge_pair(m))
                         and parsed.merge_result(*_merge_pair(m)) in vocab]
    data["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in data.get("added_tokens", []) if a["id"] in new_id]
    _remap_processor(data.get("post_processor"), new_id)
    if data.get("padding") and data["padding"].get("pad_id") is not None:
        data["padding"]["pad_id"] = new_id.get(data["padding"]["pad_id"], 0)
    return data


def _remap_processor(node, new_id: dict[int, int]) -> None:
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TemplateProcessing":
        for spec in node.get("special_tokens", {}).values():
            spec["ids"] = [new_id[i] for i in spec.get("ids", [])]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for name in ("sep", "cls"):
            if node.get(name):
                node[name] = [node[name][0], new_id[node[name][1]]]
    for child in node.get("processors") or []:
        _remap_processor(child, new_id)


def write_trimmed_tokenizer(tokenizer, kept: list[int], directory: str | Path) -> None:
    """Saves `tokenizer` into `directory` with its vocabulary cut to `kept` (sorted original ids).

    The directory holds tokenizer.json and the tokenizer's config, none of the slow tokenizer's vocabulary files
    (they would describe the old ids), so `AutoTokenizer.from_pretrained(directory)` loads the trimmed vocabulary.
    """
    directory = Path(directory)
    parsed = TokenizerJson(tokenizer)
    missing = [i for i in kept if i not in parsed.id_to_token]
    if missing:
        raise UnsupportedModuleError(
            f"kept ids {missing[:10]} are not tokens of {type(tokenizer).__name__} (its ids end at "
            f"{max(parsed.id_to_token)}): the model's rows past the tokenizer's vocabulary cannot be kept")
    tokenizer.save_pretrained(str(directory))
    for name in _SLOW_FILES:
        (directory / name).unlink(missing_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(trimmed_json(parsed, kept), ensure_ascii=False), "utf-8")
    _remap_config_ids(directory / "tokenizer_config.json", {old: new for new, old in enumerate(kept)})


def _remap_config_ids(path: Path, new_id: dict[int, int]) -> None:
    """tokenizer_config.json names added tokens by id (`added_tokens_decoder`): renumber them, drop the dropped."""
    if not path.exists():
        return
    config = json.loads(path.read_text("utf-8"))
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in decoder.items() if int(k) in new_id}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
