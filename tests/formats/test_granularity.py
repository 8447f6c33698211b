import pytest

from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec, weight_block


def test_blocks_per_granularity():
    assert weight_block(WeightSpec(bits=4, group_size=64), 10, 128) == (1, 64)
    assert weight_block(WeightSpec(bits=4, group_size=-1), 10, 128) == (1, 128)
    assert weight_block(WeightSpec(bits=4, granularity="tensor"), 10, 128) == (10, 128)


def test_group_that_does_not_divide_names_the_layer_and_the_options():
    with pytest.raises(
        LowbitError, match=r"576 of layer model\.q_proj.*\[16, 32, 48, 64, 96, 192\]"
    ):
        weight_block(WeightSpec(bits=4, group_size=128), 576, 576, "model.q_proj")
    with pytest.raises(LowbitError, match=r"in_features 27 of layer body\.0; use -1 \(per-ch"):
        weight_block(WeightSpec(bits=4, group_size=64), 64, 27, "body.0")  # no group size fits
