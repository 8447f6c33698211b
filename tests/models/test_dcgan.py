"""The DCGAN generator port and BatchNorm folding (random weights; the real checkpoint is
scored in benchmarks/image_table.py)."""

import pytest
import torch

from helpers import randomize_batchnorm
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models.images.dcgan import DCGANGenerator
from lowbit.models.normalize import fold_batchnorm
from lowbit.nn import QuantConv


def _generator() -> DCGANGenerator:
    torch.manual_seed(0)
    return randomize_batchnorm(DCGANGenerator(ngf=8))


def test_shapes_checkpoint_keys_and_bad_latents():
    model = _generator()
    keys = set(DCGANGenerator().state_dict())
    assert {"main.0.weight", "main.1.running_var", "main.12.weight"} <= keys
    with torch.no_grad():
        y = model(torch.randn(2, 100))
    assert y.shape == (2, 3, 64, 64) and float(y.abs().max()) <= 1
    with pytest.raises(LowbitError, match="latents"):
        model(torch.randn(2, 3, 8, 8))


def test_batchnorm_folds_into_transposed_convs_exactly():
    model, z = _generator(), torch.randn(3, 100)
    with torch.no_grad():
        before = model(z)
        assert fold_batchnorm(model) == 4
        after = model(z)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    training = _generator().train()
    assert fold_batchnorm(training) == 0  # batch statistics: nothing fixed to fold


def test_quantizing_folds_first_then_packs_every_conv():
    model, z = _generator(), torch.randn(3, 100)
    with torch.no_grad():
        ref = model(z)
    from helpers import make_recipe

    api.quantize(model, make_recipe({"bits": 8, "group_size": -1}, ignore=()), progress=False)
    convs = [m for m in model.modules() if isinstance(m, QuantConv)]
    assert len(convs) == 5 and not any(isinstance(m, torch.nn.BatchNorm2d)
                                       for m in model.modules())  # fmt: skip
    assert all(c.bias is not None for c in convs[:4])  # the folded BatchNorm's shift
    with torch.no_grad():
        err = (model(z) - ref).pow(2).mean() / ref.pow(2).mean()
    assert float(err) < 1e-3


def test_a_saved_quantized_image_model_loads_and_reproduces_its_outputs(tmp_path):
    """The folder records the architecture's name; loading builds it, folds its BatchNorms as
    quantization did and gets the same outputs exactly (here without the real weights)."""
    from helpers import make_recipe
    from lowbit.models.load import LoadedModel, load_model

    model, z = _generator_full(), torch.randn(2, 100)
    report = api.quantize(model, make_recipe({"bits": 4, "group_size": 32}, ignore=()),
                          progress=False)  # fmt: skip
    src = LoadedModel(model, None, "dcgan-faces", "image")
    folder = api.save(model, tmp_path / "q", report, source=src)
    loaded = load_model(str(folder))
    assert loaded.kind == "lowbit" and loaded.manifest["layers"]["main.0"]["conv"]["transposed"]
    with torch.no_grad():
        assert torch.equal(loaded.model(z), model(z))
    from lowbit.export import export

    with pytest.raises(LowbitError, match="image model: it exports to onnx"):
        export(folder, "gguf", tmp_path / "x.gguf")  # onnx: tests/export/test_onnx_image.py


def _generator_full() -> DCGANGenerator:
    torch.manual_seed(1)
    return DCGANGenerator().eval()
