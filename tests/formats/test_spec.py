import pytest

from lowbit.errors import LowbitError
from lowbit.formats import ActivationSpec, ObserverSpec, WeightSpec


def test_group_size_minus_one_is_per_channel_and_round_trips():
    spec = WeightSpec.from_dict({"bits": 4, "group_size": -1})
    assert spec.granularity == "channel"
    assert spec.to_dict()["group_size"] == -1
    assert WeightSpec.from_dict(spec.to_dict()) == spec


def test_defaults_symmetric_by_format():
    assert WeightSpec(bits=4).symmetric is False
    assert WeightSpec(format="nf4", group_size=64).symmetric is True


def test_observer_shorthand():
    spec = WeightSpec.from_dict({"bits": 3, "group_size": 32, "observer": "mse"})
    assert spec.observer == ObserverSpec(name="mse")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bits": 9, "group_size": 64}, "1 to 8 bits"),
        ({"bits": 4, "group_size": 0}, "group_size"),
        ({"bitz": 4}, "unknown key 'bitz'"),
        ({"bits": "four"}, "expected int"),
        ({"format": "nf4", "symmetric": False, "bits": 4}, "symmetric only"),
        ({"bits": 4, "granularity": "group", "group_size": -1}, "positive integer"),
        ({"bits": 4, "observer": {"name": "median"}}, "not one of"),
        ({"bits": 4, "observer": {"name": "percentile", "percentile": 20}}, "percentile"),
    ],
)
def test_invalid_weight_specs(data, message):
    with pytest.raises(LowbitError, match=message):
        WeightSpec.from_dict(data)


def test_activation_spec_validation():
    assert ActivationSpec.from_dict({"bits": 8}).granularity == "token"
    with pytest.raises(LowbitError, match="4 or 8"):
        ActivationSpec(bits=6)
    with pytest.raises(LowbitError, match="dynamic"):
        ActivationSpec(granularity="token", dynamic=False)


def test_short_names():
    assert WeightSpec(bits=4, group_size=64).short() == "int4-asym-g64"
    assert WeightSpec(bits=8, symmetric=True, group_size=-1).short() == "int8-sym-channel"
    assert WeightSpec(format="fp16", bits=16).short() == "fp16"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bits": 6}, "4 or 8"),
        ({"granularity": "token", "dynamic": False}, "dynamic: true"),
        ({"granularity": "channel"}, "token, tensor"),
        ({"granularity": "tensor", "dynamic": False, "observer": "hqq"}, "weights only"),
    ],
)
def test_activation_spec_errors(data, message):
    with pytest.raises(LowbitError, match=message):
        ActivationSpec.from_dict(data)
