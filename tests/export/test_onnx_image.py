"""ONNX export of quantized image models: QDQ graphs that ONNX Runtime runs to lowbit's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.models.images.dcgan import DCGANGenerator
from lowbit.models.load import load_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CH = {"group_size": -1}
W8 = {"bits": 8, "symmetric": True, **CH}


def acts(dynamic: bool, symmetric: bool) -> dict:
    return {"bits": 8, "granularity": "tensor", "dynamic": dynamic, "symmetric": symmetric}


RECIPES = {  # name -> (recipe body, tolerance on max |ORT - lowbit| / max |lowbit|)
    "w8-sym-channel": ({"weights": W8}, 1e-5),
    "w4-int-zero-g16": ({"weights": {"bits": 4, "group_size": 16, "zero_point": "int"}}, 1e-5),
    "w4-offsets-channel": ({"weights": {"bits": 4, **CH}}, 1e-5),
    "w3-sym-g16": ({"weights": {"bits": 3, "group_size": 16, "symmetric": True}}, 1e-5),
    "w8a8-static": ({"weights": W8, "activations": acts(False, False)}, 1e-3),
    "w8a8-dynamic": ({"weights": W8, "activations": acts(True, False)}, 1e-3),
    "w8a8-dynamic-sym": ({"weights": W8, "activations": acts(True, True)}, 1e-3),
}


@pytest.fixture
def small_gan(monkeypatch):
    def build() -> DCGANGenerator:
        torch.manual_seed(3)
        return DCGANGenerator(ngf=8).eval()

    monkeypatch.setattr("lowbit.models.images.dcgan_faces", build)
    monkeypatch.setattr("lowbit.models.images.DCGANGenerator", build)  # the reload's skeleton


def _quantized(tmp_path, name: str, body: dict):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps({"version": 1, "name": name, **body}))
    out = tmp_path / name
    assert main(["quantize", "dcgan-faces", "--recipe", str(recipe), "--out", str(out), "-q"]) == 0
    return out


CI = ("w4-int-zero-g16",)  # the rest under slow: each is a CLI quantize + export, seconds


@pytest.mark.parametrize(
    "name", [n if n in CI else pytest.param(n, marks=pytest.mark.slow) for n in RECIPES]
)
def test_onnx_runtime_computes_lowbits_outputs(small_gan, tmp_path, name):
    body, tol = RECIPES[name]
    folder = _quantized(tmp_path, name, body)
    result = export(folder, "onnx", tmp_path / f"{name}-onnx")
    path = result.path / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 100, 1, 1, generator=torch.Generator().manual_seed(1))  # batch 3: dynamic
    with torch.no_grad():
        ours = load_model(str(folder), kernels=False).model(x).numpy()
    theirs = session.run(None, {"input": x.numpy()})[0]
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < tol
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"DequantizeLinear", "ConvTranspose"} <= ops
    stored = {t.name for t in graph.initializer}  # codes are stored typed, never cast at load
    assert not [n for n in graph.node if n.op_type == "Cast" and n.input[0] in stored]
    types = {t.data_type for t in graph.initializer}
    bits = body["weights"]["bits"]
    code_type = {8: onnx.TensorProto.INT8}.get(bits, onnx.TensorProto.UINT4)
    if body["weights"].get("symmetric") is not True and bits == 8:
        code_type = onnx.TensorProto.UINT8
    assert code_type in types  # 4-bit and smaller codes are packed two to a byte
    assert ("QuantizeLinear" in ops) == ("activations" in body)


@pytest.mark.slow
def test_four_bit_codes_take_half_a_byte(small_gan, tmp_path):
    code_bytes = {}
    for name in ("w8-sym-channel", "w4-offsets-channel"):
        folder = _quantized(tmp_path, name, RECIPES[name][0])
        path = export(folder, "onnx", tmp_path / f"{name}-onnx").path / "model.onnx"
        integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT4)
        graph = onnx.load(str(path)).graph
        codes = [t for t in graph.initializer if len(t.dims) == 4 and t.data_type in integer]
        code_bytes[name] = sum(len(t.raw_data) for t in codes)
        assert sum(int(np.prod(t.dims)) for t in codes) == 145_792  # every conv weight
    assert code_bytes == {"w8-sym-channel": 145_792, "w4-offsets-channel": 145_792 // 2}


def test_other_formats_of_an_image_model_are_one_line_errors(small_gan, tmp_path):
    folder = _quantized(tmp_path, "w8", RECIPES["w8-sym-channel"][0])
    with pytest.raises(LowbitError, match="exports to onnx") as err:
        export(folder, "gguf", tmp_path / "x.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_the_class_conditional_generator_exports(monkeypatch, tmp_path):
    """cdcgan-eyes checks its class column in eager runs only: the exported graph has no
    data-dependent branch, and ONNX Runtime gives lowbit's outputs for every colour."""
    from lowbit.models.images.cdcgan import CDCGANGenerator, cycling_classes

    def build() -> CDCGANGenerator:
        torch.manual_seed(3)
        return CDCGANGenerator(ngf=4).eval()

    monkeypatch.setattr("lowbit.models.images.cdcgan_eyes", build)
    monkeypatch.setattr("lowbit.models.images.CDCGANGenerator", build)
    recipe = tmp_path / "w8.yaml"
    recipe.write_text(json.dumps({"version": 1, "name": "w8", "weights": W8}))
    folder = tmp_path / "eyes"
    assert main(["quantize", "cdcgan-eyes", "--recipe", str(recipe), "--out", str(folder),
                 "-q"]) == 0  # fmt: skip
    path = export(folder, "onnx", tmp_path / "eyes-onnx").path / "model.onnx"
    x = cycling_classes(torch.randn(8, 100, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ours = load_model(str(folder), kernels=False).model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5


def test_a_super_resolution_model_runs_on_any_image_size(monkeypatch, tmp_path):
    """An image-to-image model's graph leaves height and width free (traced on the 256 x 256
    evaluation images): ONNX Runtime upscales other sizes, odd and non-square, as lowbit does."""
    from lowbit.models.images.waifu2x import UpConv7

    def build() -> UpConv7:
        torch.manual_seed(0)
        return UpConv7().eval()

    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", build)
    recipe = tmp_path / "w8.yaml"
    recipe.write_text(json.dumps({"version": 1, "name": "w8", "weights": W8, "ignore": []}))
    folder = tmp_path / "sr"
    assert main(["quantize", "waifu2x-upconv7", "--recipe", str(recipe), "--out", str(folder),
                 "-q"]) == 0  # fmt: skip
    out = export(folder, "onnx", tmp_path / "sr-onnx").path
    info = json.loads((out / "lowbit_onnx.json").read_text())
    assert info["inputs"]["input"] == "float32 (batch, 3, height, width)"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model = load_model(str(folder), kernels=False).model
    for h, w in ((40, 72), (33, 30)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            ours = model(x).numpy()
        theirs = session.run(None, {"input": x.numpy()})[0]
        assert theirs.shape == ours.shape == (1, 3, 2 * h, 2 * w)
        assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5
