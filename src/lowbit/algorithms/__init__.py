"""Quantization algorithms: one file each, a pure tensor core with no hooks or model access."""

from lowbit.algorithms.lorc import lorc_factors, with_lorc
from lowbit.algorithms.rtn import rtn

__all__ = ["lorc_factors", "rtn", "with_lorc"]
