"""Text in and out of the decode loop: prompts, chat templates, streamed text, stop texts."""

import random

import pytest
from transformers import AutoTokenizer

from lowbit.errors import LowbitError
from lowbit.runtime.text import StopText, TextStream, _overlap, chat_ids, text_ids


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on a few lines with multi-byte
    characters, so that one character can span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["the quick brown fox jumps over the lazy dog", "naïve café déjà vu", "日本語 テキスト"]
    tok.train_from_iterator(lines * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    folder = tmp_path_factory.mktemp("bytes")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


TEXT = "the lazy fox — naïve 日本語 café, the quick dog jumps 🦊 over déjà vu " * 8


def test_streamed_pieces_add_up_to_the_whole_decode(byte_tokenizer):
    ids = byte_tokenizer(TEXT)["input_ids"]
    lengths = []

    class Counting:  # the tokenizer, recording how many ids each decode call gets
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return byte_tokenizer.decode(ids, **kwargs)

    stream = TextStream(Counting())
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)  # no half characters
    assert "".join(pieces) + stream.flush() == byte_tokenizer.decode(ids)
    assert len(ids) > 200 and max(lengths) < 8  # each push decodes a few tokens, not all


def test_an_unfinished_character_comes_out_at_the_flush(byte_tokenizer):
    ids = byte_tokenizer("fox 🦊")["input_ids"]
    stream = TextStream(byte_tokenizer)
    out = "".join(stream.push(i) for i in ids[:-1])
    assert out + stream.flush() == byte_tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("stops", [["jumps"], ["zzz", "dog j"], ["é"], ["🦊 over"]])
def test_stop_text_cuts_before_the_first_stop(byte_tokenizer, stops):
    ids = byte_tokenizer(TEXT)["input_ids"]
    text = StopText(byte_tokenizer, stops)
    out = ""
    for i in ids:
        out += text.push(i)
        if text.stopped:
            break
    out += text.flush()
    whole = byte_tokenizer.decode(ids)
    first = min(whole.find(s) for s in stops if s in whole)
    assert text.stopped and out == whole[:first]


def test_a_stop_text_that_never_appears_holds_nothing_back(byte_tokenizer):
    ids = byte_tokenizer("the quick dog")["input_ids"]
    text = StopText(byte_tokenizer, ["dogs"])
    out = "".join(text.push(i) for i in ids)
    assert not out.endswith("dog")  # "dog" could still become "dogs"
    assert out + text.flush() == "the quick dog" and not text.stopped


def test_text_that_is_not_unicode_or_a_template_refusal_is_a_lowbit_error(byte_tokenizer):
    with pytest.raises(LowbitError, match="not valid Unicode"):
        text_ids(byte_tokenizer, "fox \udfff")
    byte_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(LowbitError, match="roles must alternate"):
        chat_ids(byte_tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(LowbitError, match="not valid Unicode"):
        chat_ids(byte_tokenizer, [{"role": "user", "content": "\ud800"}])


def test_the_held_back_end_is_the_longest_start_of_a_stop():
    """_overlap against its definition (k < len(stop), text ends with stop[:k]) on random
    short texts over a small alphabet, where overlaps are common."""
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choices("ab", k=rng.randint(0, 9)))
        stop = "".join(rng.choices("ab", k=rng.randint(1, 6)))
        want = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert _overlap(text, stop) == want, (text, stop)
