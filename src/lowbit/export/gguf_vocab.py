"""A SentencePiece-style ``tokenizer.json`` (BPE with byte fallback: Llama 1/2, Mistral,
TinyLlama, ...) as llama.cpp's ``llama`` tokenizer reads it, and the name of a GPT-2-style
tokenizer's pre-tokenizer as llama.cpp knows it (:func:`bpe_pre`).

Written by hand because gguf's ``LlamaHfVocab`` gives every token the placeholder score -1000,
while llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token scores
highest: with equal scores it splits words otherwise than the model's tokenizer. A
SentencePiece BPE model scores each piece by its merge order, and its ``tokenizer.json`` keeps
that order as the token ids, so a token's score here is minus its id (SentencePiece's own
``-index``); bytes, the unknown token and added tokens score 0, as in SentencePiece's files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from lowbit.errors import LowbitError

BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# The split patterns of the tokenizer.json files of Qwen2 (digits one at a time) and Llama 3
# (digits in threes), which llama.cpp's "qwen2" and "llama-bpe" pre-tokenizers apply
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {_WORDS + r"\p{N}|" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}|" + _REST: "llama-bpe"}


def is_sentencepiece_bpe(folder: Path) -> bool:
    """Whether ``folder``'s tokenizer.json is a BPE with byte fallback (SentencePiece's)."""
    try:
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError):
        return False
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def write_sentencepiece_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    """Tokens, scores, types, the space prefix and the special ids of ``folder``'s
    SentencePiece-style tokenizer.json; rows up to ``n_vocab`` (the model's embedding) that the
    tokenizer does not use are written as unused ``[PADi]`` tokens, as llama.cpp's converter
    does."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    if size > n_vocab:
        raise LowbitError(f"{folder}: the tokenizer has {size} tokens, the model's embedding "
                          f"{n_vocab} rows")  # fmt: skip
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [0.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        byte = BYTE.fullmatch(text) is not None
        types[i] = gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL
        scores[i] = 0.0 if byte else -float(i)
    for i, token in added.items():
        tokens[i], scores[i] = token["content"], 0.0
        types[i] = gguf.TokenType.CONTROL if token["special"] else gguf.TokenType.USER_DEFINED
    special = gguf.vocab.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    unk = vocab.get(data["model"].get("unk_token"), special.special_token_ids.get("unk"))
    if unk is not None:  # UNKNOWN, as in SentencePiece's model, even when also an added token
        types[unk], scores[unk] = gguf.TokenType.UNKNOWN, 0.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_space_prefix(data))
    for kind, added_by_template in zip(("bos", "eos"), _template_ends(data), strict=True):
        special.add_special_token.setdefault(kind, added_by_template)  # else readers add BOS
    special.add_to_gguf(writer, quiet=True)


def _template_ends(data: dict) -> tuple[bool, bool]:
    """Whether the tokenizer's post-processor puts a special token before / after a single
    text (``<s>`` first: Llama 2's BOS), as ``tokenizer_config.json`` may not say."""
    processor = data.get("post_processor") or {}
    found = [processor, *processor.get("processors", [])]
    template = next((p for p in found if p.get("type") == "TemplateProcessing"), {})
    single = template.get("single") or [{}]
    return "SpecialToken" in single[0], "SpecialToken" in single[-1]


def _space_prefix(data: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (SentencePiece's dummy prefix): a
    Prepend normalizer (Llama 2's), or a Metaspace pre-tokenizer that prepends."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    metaspace = re.search(r'"type": "Metaspace"[^}]*"prepend_scheme": "(\w+)"', text)
    return metaspace is not None and metaspace.group(1) != "never"


def bpe_pre(folder: Path) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of ``folder``'s GPT-2-style
    tokenizer.json, or None where none of the names below splits text as it does.

    llama.cpp does not read a tokenizer.json's pre-tokenizer: a GGUF names one of the split rules
    it has built in, and an unknown or missing name gets its "default" rule, which splits runs of
    punctuation and digits otherwise than these tokenizers. The names here are those whose rules
    are the tokenizer's: GPT-2's byte-level regex alone ("gpt-2"); digits one at a time before it
    ("smollm", or "starcoder" where decoding cleans up spaces); Qwen2's and Llama 3's patterns.
    llama.cpp's own converter recognises tokenizers by hashing their output on a fixed text
    against a list of known models; matching the rules themselves also names fine-tunes and
    re-uploads of those tokenizers."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and last.get("use_regex", True)
    ):
        return "starcoder" if _cleans_spaces(folder) else "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        name = SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name == "llama-bpe" and not data.get("model", {}).get("ignore_merges"):
            return None  # llama.cpp's llama-bpe also skips merges for whole-token words
        return name
    return None


def _cleans_spaces(folder: Path) -> bool:
    """tokenizer_config.json's ``clean_up_tokenization_spaces`` (transformers' default: off)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("clean_up_tokenization_spaces", False))
