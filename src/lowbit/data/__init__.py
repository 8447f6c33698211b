"""Text corpora and token windows for calibration and evaluation."""

from lowbit.data.corpora import Corpus, corpus_sources, disjoint_texts, load_corpus
from lowbit.data.inputs import ModelInputs
from lowbit.data.tokens import calibration_windows, corpus_ids, eval_windows, ids_sha256

__all__ = [
    "Corpus",
    "ModelInputs",
    "calibration_windows",
    "corpus_ids",
    "corpus_sources",
    "disjoint_texts",
    "eval_windows",
    "ids_sha256",
    "load_corpus",
]
