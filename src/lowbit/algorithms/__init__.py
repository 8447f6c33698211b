"""Quantization algorithms: one file each, a pure tensor core with no hooks or model access."""

from lowbit.algorithms.rtn import rtn

__all__ = ["rtn"]
