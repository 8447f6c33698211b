"""The waifu2x upconv7 port: shapes, the Chainer .npz reader, bad inputs (no download here; the
real weights are scored in benchmarks/image_table.py and the slow test)."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.images.waifu2x import UpConv7, load_npz


def _npz(model: UpConv7, drop: str | None = None) -> bytes:
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)] + [model.up]
    arrays = {}
    for i, conv in enumerate(convs, 1):
        arrays[f"conv{i}/W"] = torch.randn_like(conv.weight).numpy()
        if conv.bias is not None:
            arrays[f"conv{i}/b"] = torch.randn_like(conv.bias).numpy()
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
