"""LiteRT export of quantized image models, checked in the LiteRT interpreter: the file's
outputs equal the folder's, the codes read back are the layers' own (in the file's
(out, kh, kw, in) order), and what has no form here is a one-line error."""

import numpy as np
import pytest
import torch

from helpers import SMALL_IMAGE as SMALL
from helpers import make_recipe
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.models.load import LoadedModel, load_model
from lowbit.nn import QuantConv

pytest.importorskip("litert_torch", reason="the litert extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")


def _folder(tmp_path, model, name, weights, acts=None):
    report = api.quantize(model, make_recipe(weights, acts, ignore=()), progress=False)
    return api.save(model, tmp_path / "q", report, source=LoadedModel(model, None, name, "image"))


def _run(path, x):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    (name,) = interp.get_signature_list()["serving_default"]["inputs"]
    (y,) = interp.get_signature_runner()(**{name: x.numpy()}).values()
    return torch.from_numpy(y)


@pytest.mark.parametrize("weights", [
    {"bits": 8, "group_size": -1, "symmetric": True},
    {"bits": 4, "group_size": -1, "symmetric": False, "zero_point": "int"},
])  # fmt: skip
def test_a_super_resolution_model_runs_in_litert_with_its_exact_codes(small_sr, tmp_path,
                                                                     weights):  # fmt: skip
    from ai_edge_litert.tools import flatbuffer_utils

    from lowbit.export.litert_codes import read_codes

    folder = _folder(tmp_path, small_sr(), "waifu2x-upconv7", weights)
    result = export(folder, "litert", tmp_path / "sr.tflite")
    bits = weights["bits"]
    assert set(result.tensor_types) == {"body.0", "body.2", "body.4", "body.6", "body.8",
                                        "body.10", "up"}  # fmt: skip
    assert all(kind.startswith(f"int{bits}-channel") for kind in result.tensor_types.values())
    assert result.bytes < 995_000 * 4 * (bits + 1) / 32  # codes, not float32 weights
    model = load_model(str(folder), kernels=False).model
    with torch.no_grad():
        want = model(SMALL)
    got = _run(result.path, SMALL)  # the last layer: a transposed convolution that crops
    assert got.shape == want.shape == (1, 3, 48, 56)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    stored = read_codes(flatbuffer_utils.read_model(str(result.path)))
    assert len(stored) == 7
    up = model.up
    codes = up.int8_codes().reshape(3, 256, 4, 4).permute(0, 2, 3, 1).reshape(3, -1)
    assert any(np.array_equal(enc.codes, codes.numpy()) for enc in stored.values())


def test_generators_export_and_what_has_no_form_is_refused(small_sr, tmp_path):
    from lowbit.models.images.dcgan import DCGANGenerator

    torch.manual_seed(1)
    gan = DCGANGenerator(ngf=8).eval()
    folder = _folder(tmp_path / "gan", gan, "dcgan-faces", {"bits": 8, "group_size": -1,
                                                           "symmetric": True})  # fmt: skip
    result = export(folder, "litert", tmp_path / "gan.tflite")
    z = torch.randn(1, 100, 1, 1)
    with torch.no_grad():
        want = load_model(str(folder), kernels=False).model(z)
    torch.testing.assert_close(_run(result.path, z), want, rtol=0, atol=1e-5)
    static = {"bits": 8, "granularity": "tensor", "dynamic": True, "symmetric": False}
    w8a8 = _folder(tmp_path / "w8a8", small_sr(), "waifu2x-upconv7",
                   {"bits": 8, "group_size": -1, "symmetric": True}, static)  # fmt: skip
    with pytest.raises(LowbitError, match="has no full-integer LiteRT form"):  # dynamic ranges
        export(w8a8, "litert", tmp_path / "x.tflite")
    assert not (tmp_path / "x.tflite").exists()  # nothing half-written
    torch.manual_seed(1)
    grouped = _folder(tmp_path / "g16", DCGANGenerator(ngf=8).eval(), "dcgan-faces",
                      {"bits": 4, "group_size": 16, "symmetric": True})  # fmt: skip
    assert any(isinstance(m, QuantConv) for m in load_model(str(grouped)).model.modules())
    with pytest.raises(LowbitError, match="group blocks has no LiteRT form"):
        export(grouped, "litert", tmp_path / "x.tflite")
