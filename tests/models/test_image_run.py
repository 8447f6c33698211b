"""lowbit.models.images.run: outputs to [0, 1], one upscale (grey in, grey out), PNG bytes."""

import io

import numpy as np
import torch
from PIL import Image

from lowbit.models.images.run import png_bytes, to_unit, upscale_image


def test_outputs_map_to_unit_range_and_a_grey_input_comes_back_grey():
    assert torch.equal(to_unit(torch.tensor([-2.0, -1.0, 0.0, 1.0]), (-1, 1)),
                       torch.tensor([0.0, 0.0, 0.5, 1.0]))  # fmt: skip
    double = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    grey = torch.rand(1, 1, 3, 4).expand(1, 3, 3, 4)
    out = upscale_image(double, grey, (0, 1))
    assert out.shape == (1, 6, 8) and torch.allclose(out[0], double(grey)[0, 0])
    colour = torch.rand(1, 3, 3, 4)
    assert upscale_image(double, colour, (0, 1)).shape == (3, 6, 8)


def test_png_bytes_keep_eight_bit_colour_and_sixteen_bit_grey():
    colour = torch.tensor([0, 128, 255]).float().div(255).reshape(3, 1, 1).expand(3, 2, 2)
    with Image.open(io.BytesIO(png_bytes(colour))) as image:
        assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [0, 128, 255]
    grey = torch.tensor([[0.0, 1.0], [1000 / 65535, 54321 / 65535]])[None]
    with Image.open(io.BytesIO(png_bytes(grey, bits=16))) as image:
        assert np.asarray(image).astype(int).tolist() == [[0, 65535], [1000, 54321]]
    with Image.open(io.BytesIO(png_bytes(grey))) as image:
        assert image.mode == "L"  # 8 bits unless asked
