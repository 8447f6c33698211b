import pytest
import torch
from torch import nn
from transformers.integrations.bitnet import AutoBitLinear
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

from lowbit.models import quantizable_layers
from lowbit.nn.linear_like import is_linear


class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Unchanged(nn.Linear):
    pass


@pytest.mark.parametrize("bias", [True, False])
def test_a_subclass_that_computes_the_linear_map_counts(bias):
    assert is_linear(FalconLinear(8, 4, bias=bias))
    assert is_linear(_Unchanged(8, 4, bias=bias))
    with torch.device("meta"):  # a streamed skeleton's layer: its weight holds no numbers
        assert is_linear(FalconLinear(8, 4, bias=bias))


def test_a_subclass_with_another_map_does_not():
    assert not is_linear(_Scaled(8, 4))
    assert not is_linear(nn.Conv2d(3, 3, 1))


def test_library_layers_that_are_not_plain_linears_are_left_alone():
    class Config:  # what PhimoeTopKRouter reads
        hidden_size, num_local_experts, num_experts_per_tok = 8, 4, 2
        router_jitter_noise, input_jitter_noise = 0.0, 0.0

    assert not is_linear(PhimoeTopKRouter(Config()))  # returns top-k choices
    assert not is_linear(AutoBitLinear(8, 4, bias=False))  # quantizes its own inputs


def test_quantizable_layers_finds_subclassed_linears():
    model = nn.Sequential(FalconLinear(4, 8), nn.ReLU(), _Scaled(8, 8), _Unchanged(8, 2))
    assert [n for n, _ in quantizable_layers(model)] == ["0", "3"]


def test_asking_leaves_the_layer_as_it_was():
    """A QAT layer's fake-quantizer observes its input: the stand-in must not update it."""
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import get_default_qat_qconfig

    layer = QATLinear(8, 4, qconfig=get_default_qat_qconfig("fbgemm"))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert not is_linear(layer)  # (fake-quantized weights)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_forward_that_counts_its_calls_is_not_counted_by_asking():
    class Counted(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.calls = [0]

        def forward(self, x):
            self.calls[0] += 1
            return super().forward(x)

    layer = Counted(8, 4)
    assert is_linear(layer) and layer.calls == [0]
