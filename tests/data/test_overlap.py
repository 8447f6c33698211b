"""Calibration and evaluation text must not overlap: a copy, a part, a superset or a re-spaced
version of the calibration text is refused; unrelated texts pass; a shared quotation is logged."""

import logging

import pytest

from lowbit.data.corpora import Corpus
from lowbit.data.overlap import MAX_SHARED, calibration_text, check_disjoint, shared_fraction
from lowbit.errors import LowbitError

WORDS = ("gold", "time", "stitch", "dog", "worm", "bird", "fox", "quick", "brown", "lazy",
         "over", "the", "a", "is", "not", "in", "that")  # fmt: skip


def _text(seed: int, n: int = 4000) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(n))


def test_parts_supersets_and_respaced_copies_are_found():
    calib = Corpus("calib", (_text(0),))
    t = calib.text
    parts = [("plus", t + "\n\none more document"), ("half", t[len(t) // 3 :]),
             ("middle", t[1000:3000]), ("spaced", t.replace(" ", "  \n", 50))]  # fmt: skip
    for name, text in parts:
        other = Corpus(name, (text,))
        assert shared_fraction(calib, other) > 0.95, name
        with pytest.raises(LowbitError, match=r"% of the evaluation text \(" + name):
            check_disjoint(calib, other, "--calib, --corpus")
    with pytest.raises(LowbitError, match="the same text"):
        check_disjoint(calib, Corpus("copy", calib.documents), "--calib, --corpus")


def test_unrelated_texts_pass_and_a_shared_quotation_is_only_logged(caplog):
    calib, evaluation = Corpus("a", (_text(0),)), Corpus("b", (_text(1),))
    assert shared_fraction(calib, evaluation) == 0.0
    quote = calib.text[500:700]  # 200 characters of the calibration text, under 1% of b
    with_quote = Corpus("b", (_text(1, 20000), quote))
    share = shared_fraction(calib, with_quote)
    assert 0 < share < MAX_SHARED
    with caplog.at_level(logging.WARNING):
        check_disjoint(calib, with_quote, "--calib, --corpus")
    assert "also in a" in caplog.text


def test_the_calibration_text_is_read_again_only_when_it_is_the_recorded_one(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(_text(0))
    corpus = calibration_text({"corpus": str(path)})
    assert corpus is not None and corpus.sha256 == Corpus(str(path), (_text(0),)).sha256
    assert calibration_text({"corpus": str(path), "text_sha256": corpus.sha256}) is not None
    assert calibration_text({"corpus": str(path), "text_sha256": "0" * 64}) is None  # changed
    assert calibration_text({"corpus": str(tmp_path / "gone.txt")}) is None
    assert calibration_text({"corpus": "c4"}) is None  # a hub corpus: no network here
