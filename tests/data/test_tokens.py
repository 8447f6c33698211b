import pytest
import torch

from lowbit.data import calibration_windows, corpus_ids, eval_windows, ids_sha256, load_corpus
from lowbit.errors import LowbitError


def test_eval_windows_are_consecutive_and_non_overlapping():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128, 600)
    assert w.shape == (4, 128)
    assert torch.equal(w.flatten(), ids[:512])
    assert eval_windows(ids, 128).shape == (7, 128)


def test_eval_windows_need_one_full_window():
    with pytest.raises(LowbitError, match="lower --seqlen"):
        eval_windows(torch.arange(100), 128)


def test_calibration_sampler_is_seeded():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, 8, 64, seed=0)
    assert torch.equal(a, calibration_windows(ids, 8, 64, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 8, 64, seed=1))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows of the stream
    assert ids_sha256(a) == ids_sha256(a.clone())


def test_calibration_corpus_too_short_is_a_clear_error():
    with pytest.raises(LowbitError, match="fewer than the 16 x 128"):
        calibration_windows(torch.arange(1000), 16, 128, seed=0)


def test_corpus_ids_are_cached_per_tokenizer(text_file, tokenizer, monkeypatch):
    monkeypatch.setattr("lowbit.data.tokens.CACHED_TOKENS", 100)  # the test text is short
    corpus = load_corpus(str(text_file))
    first = corpus_ids(corpus, tokenizer)
    assert first.dtype == torch.int64 and len(first) > 100
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(1))
    assert torch.equal(corpus_ids(corpus, tokenizer), first)
    assert not calls
