"""Text corpora and token windows for calibration and evaluation."""

from lowbit.data.corpora import Corpus, corpus_sources, load_corpus
from lowbit.data.inputs import ModelInputs
from lowbit.data.overlap import calibration_text, check_disjoint, disjoint_texts
from lowbit.data.tokens import calibration_windows, corpus_ids, eval_windows, ids_sha256

__all__ = [
    "Corpus",
    "ModelInputs",
    "calibration_text",
    "calibration_windows",
    "check_disjoint",
    "corpus_ids",
    "corpus_sources",
    "disjoint_texts",
    "eval_windows",
    "ids_sha256",
    "load_corpus",
]
