from torch import nn

from lowbit.models import get_module, quantizable_layers, set_module


def test_finds_linears_in_order_and_replaces_them():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2)))
    assert [n for n, _ in quantizable_layers(model)] == ["0", "2.0"]
    new = nn.Identity()
    set_module(model, "2.0", new)
    assert get_module(model, "2.0") is new
