"""Evidence: perplexity, KL and top-1 against a reference, and model size."""

from lowbit.eval.perplexity import EvalResult, Scores, score_models
from lowbit.eval.size import SizeReport, folder_layer_bytes, model_size, safetensors_header
from lowbit.eval.table import format_table

__all__ = [
    "EvalResult",
    "Scores",
    "SizeReport",
    "folder_layer_bytes",
    "format_table",
    "model_size",
    "safetensors_header",
    "score_models",
]
