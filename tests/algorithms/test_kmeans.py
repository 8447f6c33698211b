"""K-means codebook weights: the fit, its weighting, and an exact round trip through save/load."""

import pytest
import torch

from helpers import make_recipe, quantized_folder
from lowbit import api
from lowbit.algorithms import rtn
from lowbit.algorithms.kmeans import kmeans, kmeans_1d
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.models import load_folder
from lowbit.nn import QuantLinear
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe


def test_kmeans_1d_finds_separated_clusters():
    centres = torch.tensor([-3.0, -1.0, 0.5, 4.0])
    x = (centres.repeat_interleave(50) + 0.01 * torch.randn(200)).reshape(1, 200)
    found = kmeans_1d(x, 4)
    assert torch.allclose(found[0], centres, atol=0.01)


def test_codebook_beats_uniform_grid_per_channel():
    w = torch.distributions.Laplace(0.0, 1.0).sample((64, 576))
    spec = WeightSpec(bits=3, group_size=-1)
    uniform = rtn(w, spec).dequantize()
    book = kmeans(w, spec.replace(format="kmeans", symmetric=True)).dequantize()
    assert sqnr_db(w, book) > sqnr_db(w, uniform) + 2.0


def test_importance_weights_lower_the_weighted_error():
    w = torch.distributions.Laplace(0.0, 1.0).sample((32, 256))
    importance = torch.ones(256)
    importance[:16] = 100.0  # a few inputs carry large activations
    spec = WeightSpec(format="kmeans", bits=3, group_size=-1)
    plain, weighted = kmeans(w, spec).dequantize(), kmeans(w, spec, importance).dequantize()

    def cost(q):
        return (((w - q) ** 2) * importance).sum()

    assert cost(weighted) < 0.9 * cost(plain)


@pytest.mark.parametrize("calibrated", [False, True])
def test_indices_and_codebooks_round_trip_exactly(tiny_folder, tmp_path, calibrated):
    rec = Recipe.from_dict({**make_recipe({"bits": 3, "group_size": -1}).to_dict(),
                            "algorithm": "kmeans"})  # fmt: skip
    src = api.load_model(str(tiny_folder))
    g = torch.Generator().manual_seed(0)
    cal = CalibrationSet("random", 4, 32, 0, torch.randint(0, 50, (4, 32), generator=g))
    report = api.quantize(src.model, rec, cal if calibrated else None, progress=False)
    layer = src.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.spec.format == "kmeans"
    assert layer.scale.shape == (128, 1, 8)  # one 8-entry table per output row
    out = api.save(src.model, tmp_path / "q", report, source=src)
    loaded, manifest = load_folder(out)
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["format"] == "kmeans3-channel"
    back = loaded.model.layers[0].mlp.up_proj
    assert torch.equal(back.qweight, layer.qweight) and torch.equal(back.scale, layer.scale)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, src.model(x).logits)
    assert len(report.blocks) == (2 if calibrated else 0)


def test_kmeans_format_needs_the_kmeans_algorithm(tiny_folder, tmp_path):
    with pytest.raises(LowbitError, match="algorithm: kmeans"):
        quantized_folder(tiny_folder, tmp_path / "q", make_recipe({"format": "kmeans", "bits": 3}))
