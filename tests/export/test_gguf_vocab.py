"""Which llama.cpp pre-tokenizer a GPT-2-style tokenizer.json is written with in a GGUF: the one
whose split rules are the tokenizer's, never a guess."""

import json

import gguf
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from helpers import make_bpe_tokenizer, make_recipe, quantized_folder, tiny_family_model
from lowbit.export import export
from lowbit.export.gguf_vocab import bpe_pre

# the patterns transformers gives Qwen2's and Llama 3's tokenizers
QWEN2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
LLAMA3 = QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")


def _folder(tmp_path, pre, ignore_merges=False, clean=None):
    tok = Tokenizer(models.BPE({"a": 0, "b": 1}, [], ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if clean is not None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"clean_up_tokenization_spaces": clean})
        )
    return folder


def _split(pattern):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _byte_level(regex):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex)


@pytest.mark.parametrize(
    ("pre", "extra", "name"),
    [
        (_byte_level(True), {}, "gpt-2"),
        (pre_tokenizers.Sequence([pre_tokenizers.Digits(True), _byte_level(True)]), {}, "smollm"),
        (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(True), _byte_level(True)]),
            {"clean": True},
            "starcoder",
        ),
        (pre_tokenizers.Sequence([_split(QWEN2), _byte_level(False)]), {}, "qwen2"),
        (
            pre_tokenizers.Sequence([_split(LLAMA3), _byte_level(False)]),
            {"ignore_merges": True},
            "llama-bpe",
        ),
        # llama.cpp's llama-bpe also takes a word that is a token whole: not this tokenizer
        (pre_tokenizers.Sequence([_split(LLAMA3), _byte_level(False)]), {}, None),
        (pre_tokenizers.Sequence([pre_tokenizers.Digits(False), _byte_level(True)]), {}, None),
        (pre_tokenizers.Whitespace(), {}, None),
    ],
    ids=["gpt2", "smollm", "starcoder", "qwen2", "llama3", "llama3-merges", "digits", "other"],
)
def test_the_pre_tokenizer_is_named_by_its_rules(tmp_path, pre, extra, name):
    assert bpe_pre(_folder(tmp_path, pre, **extra)) == name


def test_a_gguf_names_its_tokenizers_pre_tokenizer(tmp_path, caplog):
    """make_bpe_tokenizer's byte-level tokenizer goes out as llama.cpp's "gpt-2" (its
    "default" splits punctuation and digits otherwise); one llama.cpp cannot name gets
    "default" with a warning."""
    n = len(make_bpe_tokenizer())
    src = tmp_path / "src"
    tiny_family_model("llama", vocab=n).save_pretrained(src)
    make_bpe_tokenizer().save_pretrained(src)
    folder, _ = quantized_folder(src, tmp_path / "q", make_recipe({"bits": 4, "group_size": 32}))
    reader = gguf.GGUFReader(str(export(folder, "gguf", tmp_path / "m.gguf").path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    reader = gguf.GGUFReader(str(export(folder, "gguf", tmp_path / "w.gguf").path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "default"
    assert "no pre-tokenizer known to split text as this tokenizer" in caplog.text
