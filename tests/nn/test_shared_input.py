"""Layers that read one input run as one kernel call, with the outputs of the separate layers."""

import pytest
import torch

from lowbit.eval.size import model_size
from lowbit.formats import WeightSpec
from lowbit.nn import QuantLinear, kernel_module
from lowbit.nn.shared_input import share_input
from lowbit.primitives import quantize_weight


def fast_layer(n, k=128, spec=None, bias=False):
    spec = spec or WeightSpec(bits=4, group_size=64)
    b = torch.randn(n) if bias else None
    return kernel_module(QuantLinear.from_quantized(quantize_weight(torch.randn(n, k), spec), b))


def test_shared_layers_give_the_separate_outputs():
    layers = [fast_layer(48), fast_layer(16, bias=True), fast_layer(16)]
    xs = [torch.randn(m, 128) for m in (1, 3, 40)]  # decode rows (int8 inputs), prefill rows
    alone = [[layer(x) for layer in layers] for x in xs]
    assert share_input(layers)
    for x, expected in zip(xs, alone, strict=True):
        for layer, a in zip(layers, expected, strict=True):
            b = layer(x)
            assert b.shape == a.shape and b.is_contiguous()
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_the_stack_is_held_once_and_the_cache_is_released():
    layers = [fast_layer(32), fast_layer(32)]
    before = sum(layer.storage_bytes()["codes"] for layer in layers)
    assert share_input(layers)
    assert layers[0].w.untyped_storage().data_ptr() == layers[1].w.untyped_storage().data_ptr()
    assert sum(layer.storage_bytes()["codes"] for layer in layers) == before
    x = torch.randn(1, 128)
    layers[0](x)
    assert layers[0].shared._y is not None  # waiting for its sibling
    layers[1](x)
    assert layers[0].shared._y is None


def test_a_new_input_is_computed_anew():
    layers = [fast_layer(32), fast_layer(32)]
    x1, x2 = torch.randn(1, 128), torch.randn(1, 128)
    expected = layers[1](x2)
    share_input(layers)
    layers[0](x1)  # x1's outputs wait for layer 1, which reads x2 instead
    assert torch.equal(layers[1](x2), expected)


def test_mismatched_layers_are_left_alone():
    a, b = fast_layer(32), fast_layer(32, spec=WeightSpec(bits=4, group_size=32))
    assert not share_input([a, b])
    assert a.shared is None and b.shared is None
    assert not share_input([fast_layer(32)])


def test_sharing_keeps_the_model_size():
    layers = torch.nn.ModuleList([fast_layer(32), fast_layer(16)])
    before = model_size(layers).to_dict()
    share_input(list(layers))
    assert model_size(layers).to_dict() == before


def test_symmetric_layers_share_without_offsets():
    sym = WeightSpec(bits=4, group_size=64, symmetric=True)
    layers = [fast_layer(32, spec=sym), fast_layer(16, spec=sym)]
    assert layers[0].offset.numel() == 0  # symmetric: the kernel stores no offsets
    x = torch.randn(1, 128)
    alone = [layer(x) for layer in layers]
    assert not share_input([layers[0], fast_layer(32)])  # one with offsets, one without
    assert share_input(layers)
    for layer, a in zip(layers, alone, strict=True):
        assert torch.allclose(layer(x), a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def int8_layers(layout: str, sizes: list[int], k: int = 96) -> list:
    """W8A8 kernel layers of ``sizes`` rows holding their codes as ``layout`` does."""
    from lowbit.kernels import int8
    from lowbit.nn import Int8KernelLinear

    if layout != "reference" and not int8.native_ops():
        pytest.skip("lowbit's CPU kernels not built here")
    if layout == "mm" and not int8.onednn_int8_exact():
        pytest.skip("oneDNN's int8 matmul is exact only with VNNI or AMX")
    g, out = torch.Generator().manual_seed(len(sizes)), []
    for n in sizes:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) * 0.01 + 1e-4
        weight = (int8.Int8Weight(None, scale, k, int8.pack_panels(codes)) if layout == "panels"
                  else int8.Int8Weight(codes, scale, k, mm=layout == "mm"))  # fmt: skip
        out.append(Int8KernelLinear(weight, n, torch.randn(n, generator=g) if n == 16 else None))
    return out


@pytest.mark.parametrize("layout", ["panels", "mm", "reference"])
def test_w8a8_layers_share_their_input_with_the_same_outputs(layout):
    layers = int8_layers(layout, [48, 16, 24])
    xs = [torch.randn(m, 96) * 3 for m in (1, 3, 40)]  # decode rows, prompt rows
    alone = [[layer(x) for layer in layers] for x in xs]
    assert share_input(layers)
    assert all(layer.shared is layers[0].shared for layer in layers)
    for x, expected in zip(xs, alone, strict=True):
        for layer, a in zip(layers, expected, strict=True):
            b = layer(x)
            assert b.is_contiguous() and torch.equal(a, b)


def test_w8a8_panels_of_two_layers_are_not_shared():
    layers = int8_layers("panels", [20, 16])  # 20 rows: the third panel would hold both
    assert not share_input(layers)
    assert all(layer.shared is None for layer in layers)
    assert not share_input([int8_layers("reference", [16], k=128)[0], fast_layer(16)])  # two kinds


def test_4bit_layers_share_only_on_whole_blocks_of_16_rows():
    split = [fast_layer(20), fast_layer(16)]  # rows 16..19 and 20..35 would share a block
    assert not share_input(split)
    assert all(layer.shared is None for layer in split)
    layers = [fast_layer(16), fast_layer(20)]  # the last layer's tail is the stack's tail
    x = torch.randn(1, 128)
    alone = [layer(x) for layer in layers]
    assert share_input(layers)
    for layer, a in zip(layers, alone, strict=True):
        assert torch.equal(layer(x), a)
