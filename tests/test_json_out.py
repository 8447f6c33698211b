"""--json output is strict JSON: a broken model's NaN or infinite figures are null."""

import json

from lowbit.json_out import finite, json_text


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"kl": float("nan"), "rows": [1.5, float("inf"), {"ppl": -float("inf")}], "n": 3}
    text = json_text(value)
    assert json.loads(text) == {"kl": None, "rows": [1.5, None, {"ppl": None}], "n": 3}
    assert "NaN" not in text and "Infinity" not in text
    assert finite((1.0, 2)) == [1.0, 2] and finite("nan") == "nan"
