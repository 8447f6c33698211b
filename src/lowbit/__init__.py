"""lowbit: quantize generative models to low-bit formats and measure what it cost.

The public Python API lives in :mod:`lowbit.api`; the names below are re-exported lazily so that
``import lowbit`` stays cheap (no torch import until an API function is used).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API_NAMES = (
    "quantize",
    "quantize_to",
    "evaluate",
    "save",
    "load",
    "load_model",
    "load_recipe",
    "calibration_set",
    "bench",
    "qat",
    "QATOptions",
    "analyze",
    "mixed_recipe",
)


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        return getattr(import_module("lowbit.api"), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["__version__", *_API_NAMES]
