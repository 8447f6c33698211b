"""The waifu2x upconv7 port: shapes, the Chainer .npz reader, bad inputs (no download here; the
real weights are scored in benchmarks/image_table.py and the slow test)."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.images.waifu2x import UpConv7, UpResNet10, load_npz


def _npz(model: nn.Module, drop: str | None = None) -> bytes:
    arrays = {}
    for prefix, layer in model.npz_layers():
        arrays[f"{prefix}/W"] = (0.05 * torch.randn_like(layer.weight)).numpy()
        if layer.bias is not None:
            arrays[f"{prefix}/b"] = (0.05 * torch.randn_like(layer.bias)).numpy()
    arrays.pop(drop, None)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_output_is_twice_the_input_and_weights_load_by_name():
    data = _npz(UpConv7())
    model = load_npz(UpConv7(), data)
    arrays = np.load(io.BytesIO(data))
    assert torch.equal(model.body[0].weight, torch.from_numpy(arrays["conv1/W"]))
    assert torch.equal(model.up.weight, torch.from_numpy(arrays["conv7/W"]))
    with torch.no_grad():
        y = model(torch.rand(2, 3, 10, 14))
    assert y.shape == (2, 3, 20, 28) and float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(LowbitError, match="RGB images"):
        model(torch.rand(1, 1, 10, 10))


def test_upresnet10_loads_its_arrays_by_name_and_doubles_the_size():
    data = _npz(UpResNet10())
    model = load_npz(UpResNet10(), data)
    arrays = np.load(io.BytesIO(data))
    assert torch.equal(model.res[2].fc1.weight, torch.from_numpy(arrays["res3/fc1/W"]))
    assert torch.equal(model.conv_post.weight, torch.from_numpy(arrays["conv_post/W"]))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 9, 12)).shape == (1, 3, 18, 24)
    with pytest.raises(LowbitError, match="res5/fc2/b"):
        load_npz(UpResNet10(), _npz(UpResNet10(), drop="res5/fc2/b"))


def test_missing_or_misshapen_arrays_are_named():
    with pytest.raises(LowbitError, match="conv3/b"):
        load_npz(UpConv7(), _npz(UpConv7(), drop="conv3/b"))
    buf = io.BytesIO()
    np.savez(buf, **{"conv1/W": np.zeros((1, 1, 1, 1), np.float32), "conv1/b": np.zeros(16)})
    with pytest.raises(LowbitError, match="conv1/W has shape"):
        load_npz(UpConv7(), buf.getvalue())


def test_object_arrays_are_never_unpickled():
    buf = io.BytesIO()
    np.savez(buf, **{"conv1/W": np.array([object()], dtype=object), "conv1/b": np.zeros(16)})
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(UpConv7(), buf.getvalue())
