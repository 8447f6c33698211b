"""The JSON lowbit prints (``--json``): strict JSON, which every parser reads.

Python's ``json`` writes a float that is not finite as ``NaN`` or ``Infinity``, which JavaScript,
Go and most other parsers reject; a broken model's perplexity or KL is exactly such a value, and
the scripts that watch models (cron jobs, alerting) are who reads it. Here it becomes ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value: Any, **options: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite floats as null (``options``: indent, ...)."""
    return json.dumps(finite(value), allow_nan=False, **options)
