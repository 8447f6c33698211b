"""Number formats: value sets (QType), per-tensor specs, and granularity as block shapes."""

from lowbit.formats.granularity import n_blocks, weight_block
from lowbit.formats.qtype import QType, int_type, nf4_codebook, qtype_for
from lowbit.formats.spec import ActivationSpec, ObserverSpec, WeightSpec

__all__ = [
    "ActivationSpec",
    "ObserverSpec",
    "QType",
    "WeightSpec",
    "int_type",
    "n_blocks",
    "nf4_codebook",
    "qtype_for",
    "weight_block",
]
