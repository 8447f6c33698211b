"""Full-integer LiteRT export of W8A8 image models, checked in the LiteRT interpreter: int8
tensors between the layers, lowbit's codes, scales and input ranges in the file, outputs close
to the folder's, and what has no such form is a one-line error."""

import numpy as np
import pytest
import torch

from helpers import SMALL_IMAGE as SMALL
from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.errors import LowbitError
from lowbit.eval.image import psnr
from lowbit.export import export
from lowbit.models.load import LoadedModel, load_model
from lowbit.recipes import Recipe

pytest.importorskip("litert_torch", reason="the litert extra is not installed")
pytest.importorskip("ai_edge_quantizer", reason="the litert extra is not installed")

STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}


def _w8a8(tmp_path, model, name, calib):
    body = {"version": 1, "name": "t", "algorithm": "rtn", "ignore": [], "activations": STATIC,
            "weights": {"bits": 8, "symmetric": True, "group_size": -1}}  # fmt: skip
    report = api.quantize(model, Recipe.from_dict(body), image_calibration(calib, "c"),
                          progress=False)  # fmt: skip
    return api.save(model, tmp_path / "q", report, source=LoadedModel(model, None, name, "image"))


def _ops(path):
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    flat = flatbuffer_utils.read_model(str(path))
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    sg = flat.subgraphs[0]
    for op in sg.operators:
        code = flat.operatorCodes[op.opcodeIndex]
        yield names[max(code.builtinCode, code.deprecatedBuiltinCode)], op, sg, flat


def test_a_w8a8_upscaler_runs_on_int8_tensors_with_lowbits_numbers(small_sr, tmp_path):
    from lowbit.models.images import image_models
    from lowbit.models.litert_image import LiteRTImageModel, image_info

    calib = image_models()["waifu2x-upconv7"].calibration()
    folder = _w8a8(tmp_path, small_sr(), "waifu2x-upconv7", calib)
    result = export(folder, "litert", tmp_path / "sr.tflite")
    assert set(result.tensor_types.values()) == {"int8-channel-a8"}
    assert len(result.tensor_types) == 7
    assert result.bytes < 995_000 * 1.1  # one int8 copy of the weights (not the quantizer's too)
    model = load_model(str(folder), kernels=False).model
    layers = {n: m for n, m in model.named_modules() if n in result.tensor_types}
    want = sorted((int(m.act_zero[0]) - 128, float(m.act_scale[0])) for m in layers.values())
    g = model.up.geometry  # the transposed layer's codes as the file holds them: (out, kh, kw, in)
    up = model.up.int8_codes().reshape(g.out_channels, g.in_channels, *g.kernel_size)
    up = up.permute(0, 2, 3, 1).numpy()
    seen, kinds = [], []
    for kind, op, sg, flat in _ops(result.path):
        kinds.append(kind)
        if kind in ("CONV_2D", "TRANSPOSE_CONV"):
            x = sg.tensors[op.inputs[2] if kind == "TRANSPOSE_CONV" else op.inputs[0]]
            w = sg.tensors[op.inputs[1]]
            assert x.type == w.type == 9  # INT8
            seen.append((int(x.quantization.zeroPoint[0]), float(x.quantization.scale[0])))
            if kind == "TRANSPOSE_CONV":
                raw = np.asarray(flat.buffers[w.buffer].data, np.uint8).view(np.int8)
                assert np.array_equal(raw.reshape(w.shape), up)
    # int8 from the first QUANTIZE to the last DEQUANTIZE, the output's clamp included
    assert kinds[0] == "QUANTIZE" and kinds.count("DEQUANTIZE") == 1, kinds
    assert kinds[-1] == "DEQUANTIZE" and "RELU_0_TO_1" in kinds
    assert kinds.count("LEAKY_RELU") == 6
    for (z, s), (z2, s2) in zip(want, sorted(seen), strict=True):  # lowbit's input ranges
        assert z == z2 and s2 == pytest.approx(s, rel=1e-6)
    with torch.no_grad():
        folder_out = model(SMALL)
    file_out = LiteRTImageModel(result.path, image_info(result.path))(SMALL)
    assert file_out.shape == folder_out.shape
    # one more int8 rounding per layer output, and the image's own at the end (steps of 1/255)
    db = psnr(file_out, folder_out)
    assert db > 45, db


def test_a_residual_network_with_gates_runs_on_int8_tensors(tmp_path, monkeypatch):
    """upresnet10's graph (residual adds, squeeze-excitation: mean, sigmoid gates, products):
    every operator on int8 but the output's clamp; the ranges no layer holds are measured on
    the calibration inputs (another shape than the example's); a tensor that feeds a layer and
    the skip connection keeps its own range, and the layer reads a copy requantized onto its
    static range, as lowbit rounds only the layer's input."""
    from lowbit.models.images.waifu2x import UpResNet10
    from lowbit.models.litert_image import LiteRTImageModel, image_info

    calib = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("lowbit.models.images.sr_evaluation", lambda: (SMALL, None))
    monkeypatch.setattr("lowbit.models.images.sr_calibration", lambda: calib)
    torch.manual_seed(0)
    folder = _w8a8(tmp_path, UpResNet10().eval(), "waifu2x-upresnet10", calib)
    result = export(folder, "litert", tmp_path / "x.tflite")
    assert set(result.tensor_types.values()) == {"int8-channel-a8"}
    assert len(result.tensor_types) == 23
    model = load_model(str(folder), kernels=False).model
    want = {(int(m.act_zero[0]) - 128, round(float(m.act_scale[0]), 6))
            for n, m in model.named_modules() if n in result.tensor_types}  # fmt: skip
    kinds, seen, requantized = [], set(), 0
    for kind, op, sg, _ in _ops(result.path):
        kinds.append(kind)
        if kind in ("CONV_2D", "FULLY_CONNECTED"):
            q = sg.tensors[op.inputs[0]].quantization
            seen.add((int(q.zeroPoint[0]), round(float(q.scale[0]), 6)))
        if kind == "QUANTIZE" and sg.tensors[op.inputs[0]].type == 9:  # int8 to int8
            requantized += 1
    assert seen <= want and len(seen) >= len(want) - 1  # the transposed layer's is not read here
    assert requantized >= 1
    for kind in ("ADD", "MUL", "MEAN", "LOGISTIC"):
        assert kinds.count(kind) == (6 if kind == "ADD" else 5), kind
    assert kinds.count("DEQUANTIZE") == 1 and kinds[-1] == "DEQUANTIZE", kinds
    with torch.no_grad():
        folder_out = model(SMALL)
    file_out = LiteRTImageModel(result.path, image_info(result.path))(SMALL)
    db = psnr(file_out, folder_out)
    assert db > 30, db


def test_an_operator_the_quantizer_leaves_in_float_is_refused(tmp_path):
    from lowbit.export.litert_int8 import write_litert_int8

    class Sine(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Sine(), torch.nn.Conv2d(4, 3, 3)).eval()
    calib = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    body = {"version": 1, "name": "t", "algorithm": "rtn", "ignore": [], "activations": STATIC,
            "weights": {"bits": 8, "symmetric": True, "group_size": -1}}  # fmt: skip
    api.quantize(model, Recipe.from_dict(body), image_calibration(calib, "c"), progress=False)
    out = tmp_path / "x.tflite"
    with pytest.raises(LowbitError, match="SIN .*leaves this operator in float"):
        write_litert_int8(model, calib[:1], calib, "toy", out)
    assert not out.exists()


def test_a_w8a8_generator_exports_full_integer(tmp_path, monkeypatch):
    """Transposed convolutions of stride 1 (PAD and a flipped CONV_2D in the file), cropped
    ones followed by in-place ReLUs, and a tanh at the end, all on int8."""
    from lowbit.models.images.dcgan import DCGANGenerator
    from lowbit.models.litert_image import LiteRTImageModel, image_info

    g = torch.Generator().manual_seed(0)
    calib, z = torch.randn(64, 100, 1, 1, generator=g), torch.randn(1, 100, 1, 1, generator=g)
    monkeypatch.setattr("lowbit.models.images._gan_calibration", lambda: calib)
    monkeypatch.setattr("lowbit.models.images._gan_evaluation", lambda: (z, None))
    torch.manual_seed(1)
    folder = _w8a8(tmp_path, DCGANGenerator(ngf=8).eval(), "dcgan-faces", calib)
    result = export(folder, "litert", tmp_path / "gan.tflite")
    assert set(result.tensor_types.values()) == {"int8-channel-a8"}
    kinds = [kind for kind, *_ in _ops(result.path)]
    assert "TANH" in kinds and "SELECT" not in kinds
    assert kinds[0] == "QUANTIZE" and kinds.count("DEQUANTIZE") == 1 and kinds[-1] == "DEQUANTIZE"
    with torch.no_grad():
        want = load_model(str(folder), kernels=False).model(z)
    got = LiteRTImageModel(result.path, image_info(result.path))(z)
    # outputs in [-1, 1]: PSNR on [0, 1] images
    assert psnr((got + 1) / 2, (want + 1) / 2) > 45


def test_a_convolution_flattened_into_a_linear_keeps_one_range_across_the_reshape(tmp_path):
    """conv -> ReLU -> flatten -> linear: the reshape carries the linear's input range back
    onto the convolution's output; a channel of zero weights keeps its bias in int32."""
    from lowbit.export.litert_int8 import write_litert_int8
    from lowbit.models.litert_image import LiteRTImageModel, image_info

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight[2] = 0.0  # a dead channel: its scale would be tiny
    calib = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    body = {"version": 1, "name": "t", "algorithm": "rtn", "ignore": [], "activations": STATIC,
            "weights": {"bits": 8, "symmetric": True, "group_size": -1}}  # fmt: skip
    api.quantize(model, Recipe.from_dict(body), image_calibration(calib, "c"), progress=False)
    with torch.no_grad():
        want = model(x)
    out = tmp_path / "fc.tflite"
    written = write_litert_int8(model, x, calib, "toy", out)
    assert written == {"0": "int8-channel-a8", "3": "int8-channel-a8"}
    kinds = [kind for kind, *_ in _ops(out)]
    assert "FULLY_CONNECTED" in kinds and "DEQUANTIZE" not in kinds[:-1]
    got = LiteRTImageModel(out, image_info(out))(x)
    err = float((got - want).pow(2).mean() / want.pow(2).mean())
    assert err < 1e-3, err  # int8 rounding of the conv output, not a broken range or bias
