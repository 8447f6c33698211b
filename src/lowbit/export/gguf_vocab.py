"""A SentencePiece-style ``tokenizer.json`` (BPE with byte fallback: Llama 1/2, Mistral,
TinyLlama, ...) as llama.cpp's ``llama`` tokenizer reads it.

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
