"""`lowbit quantize --max-memory`: how the calibration hidden states are held to fit."""

import argparse

import pytest

from lowbit.cli_quantize import _check_memory, _fit_memory
from lowbit.errors import LowbitError


class FakeApi:
    """Estimates whose peak depends only on how the hidden states are held."""

    def __init__(self, peaks):
        self.peaks, self.asked = peaks, []

    def estimate(self, model, recipe, calibration, progress, dtype, spill, canary):
        assert canary is True  # the canary's passes count unless --no-canary
        self.asked.append((dtype, spill))
        return {"peak_rss_mb": self.peaks[(dtype, spill)],
                "hidden": {"dtype": dtype, "spilled": spill}}  # fmt: skip


def args(limit, dtype="float32", spill=False):
    return argparse.Namespace(model="m", quiet=True, max_memory=limit, hidden_dtype=dtype,
                              spill_hidden=spill, canary=True)  # fmt: skip


PEAKS = {("float32", False): 9000, ("bfloat16", False): 6000, ("float32", True): 3000,
         ("bfloat16", True): 2900}  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "held", "asked"),
    [
        ("10GB", ("float32", False), 1),
        ("7GB", ("bfloat16", False), 2),  # bfloat16 in memory fits: not spilled
        ("4GB", ("float32", True), 3),  # only on disk fits: spilled in the dtype asked for
    ],
)
def test_max_memory_holds_the_hidden_states_the_first_way_that_fits(limit, held, asked):
    api, a = FakeApi(PEAKS), args(limit)
    plan = _fit_memory(a, api, None, calibration=object())
    assert (a.hidden_dtype, a.spill_hidden) == held and len(api.asked) == asked
    _check_memory(plan, limit)


def test_a_run_that_cannot_fit_says_what_it_needs():
    api, a = FakeApi(PEAKS), args("2GB")
    plan = _fit_memory(a, api, None, calibration=object())
    with pytest.raises(LowbitError, match="needs about 3,000 MB at its peak even with its hidden"):
        _check_memory(plan, "2GB")


def test_data_free_runs_and_explicit_choices_are_estimated_once():
    api = FakeApi(PEAKS)
    _fit_memory(args("1GB"), api, None, calibration=None)
    _fit_memory(args("1GB", "bfloat16", True), api, None, calibration=object())
    assert api.asked == [("float32", False), ("bfloat16", True)]
