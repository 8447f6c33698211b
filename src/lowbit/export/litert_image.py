"""LiteRT (TensorFlow Lite) export of a quantized image model: one ``.tflite`` holding lowbit's
exact codes.

Each quantized convolution and linear is encoded as :mod:`lowbit.export.litert_codes` encodes
a language model's linears (int8 or int4 per output channel, symmetric or with integer zero
points) and swapped for a float layer holding exactly the values its codes mean; litert-torch
converts the model at the example input's shape; each CONV_2D, TRANSPOSE_CONV and
FULLY_CONNECTED weight is then replaced by its codes feeding a DEQUANTIZE op. The runtime
computes in float32 with exactly lowbit's weights (weight-only; XNNPACK unpacks them once when
it loads the file), so the file reproduces the folder's outputs to float rounding.

The converter keeps a convolution's weight as (out, kh, kw, in) (a strided transposed
convolution's too, in TRANSPOSE_CONV; one of stride 1 becomes PAD and CONV_2D with the kernel
flipped), so the codes are written in that order, for a transposed layer in both forms (the
one found in the file is written). It legalizes no transposed
convolution whose padding crops the output (waifu2x's last layer): such a layer is converted
unpadded and followed by the crop, the same values. Not exported: grouped convolutions and
samplers that run their layers once per step; W8A8 models take the full-integer export
(:mod:`lowbit.export.litert_int8`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.assets import hidden_stem
from lowbit.errors import LowbitError
from lowbit.export.litert_codes import (
    Encoded,
    dequantize,
    digest,
    encode,
    exact_reason,
    write_codes,
)
from lowbit.export.litert_flat import add_metadata
from lowbit.models import set_module
from lowbit.nn import QuantLinear
from lowbit.nn.quant_conv import QuantConv

log = logging.getLogger(__name__)

INFO_KEY = b"lowbit"


class Cropped(nn.Module):
    """An unpadded transposed convolution followed by the crop its padding means."""

    def __init__(self, conv: nn.ConvTranspose2d, top: int, left: int, bottom: int,
                 right: int) -> None:  # fmt: skip
        super().__init__()
        self.conv, self.crop = conv, (top, left, bottom, right)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        top, left, bottom, right = self.crop
        # a copy, not a view: an in-place ReLU after it (DCGAN) would otherwise be exported as
        # writes into the uncropped tensor (PAD and SELECT ops)
        return y[:, :, top : y.shape[2] - bottom, left : y.shape[3] - right].clone()


def write_litert_image(model: nn.Module, example: Tensor, name: str, out: Path) -> dict[str, str]:
    """Convert the quantized image ``model`` (loaded without kernels) at the shape of
    ``example`` (one input, batch 1) into the file ``out``; returns each layer's encoding."""
    try:
        import litert_torch
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise LowbitError(
            "LiteRT export needs litert-torch and ai-edge-litert: pip install 'lowbit[litert]'"
        ) from None
    encoded = _swap_layers(model)
    from lowbit.export.litert_file import quiet_litert_torch

    quiet_litert_torch()
    work_dir = tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{hidden_stem(out)}.",
                                           suffix=".tmp")  # fmt: skip
    with work_dir as work, torch.no_grad():
        raw = Path(work) / "float.tflite"
        log.info("converting %s with litert-torch at input shape %s", name,
                 tuple(example.shape))  # fmt: skip
        litert_torch.convert(model.eval(), (example.float(),)).export(str(raw))
        flat = flatbuffer_utils.read_model(str(raw))
    written = write_codes(flat, encoded, weight_only=True)
    info = {"producer": "lowbit", "model": name, "input": list(example.shape), "layers": written}
    add_metadata(flat, INFO_KEY, json.dumps(info).encode())
    flatbuffer_utils.write_model(flat, str(out))
    return written


def _swap_layers(model: nn.Module) -> dict[str, tuple[str, Encoded]]:
    """Every quantized layer becomes a float layer holding what its codes mean; returns digest
    of that weight in the file's layout -> (layer, encoding in that layout)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise LowbitError("the model has no quantized layers to export")
    encoded = {}
    for name, mod in layers:
        if mod.act is not None:  # W8A8 models take lowbit.export.litert_int8
            raise LowbitError(f"{name}: {mod.act.short()} inputs: a weight-only export takes "
                              f"layers without rounded inputs")  # fmt: skip
        layer, forms = float_layer(name, mod)
        set_module(model, name, layer)
        encoded |= {digest(weight): (name, enc) for weight, enc in forms}
    return encoded


def float_layer(name: str, mod: QuantLinear) -> tuple[nn.Module, list[tuple[Tensor, Encoded]]]:
    """The float module holding what ``mod``'s codes mean, and [(its weight as the file may
    hold it, the encoding in that order)]."""
    if isinstance(mod, QuantConv):
        return _conv(name, mod)
    enc = encode(mod, name)
    layer = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    layer.weight.data = dequantize(enc).contiguous()
    if mod.bias is not None:
        layer.bias.data = mod.bias.detach().float()
    return layer, [(layer.weight, enc)]


def _conv(name: str, mod: QuantConv) -> tuple[nn.Module, list[tuple[Tensor, Encoded]]]:
    """(the float module, [(its weight as the file may hold it, the encoding in that order)])."""
    g = mod.geometry
    if g.groups != 1 or mod.spec.granularity != "channel":
        what = f"groups of {g.groups}" if g.groups != 1 else f"{mod.spec.granularity} blocks"
        raise LowbitError(f"{name}: a convolution with {what} has no LiteRT form here (per "
                          f"output channel, ungrouped only)")  # fmt: skip
    reason = exact_reason(mod)
    if reason is not None:
        raise LowbitError(f"{name}: {reason} have no exact LiteRT form; a convolution is held "
                          f"exactly as int8 or int4 per output channel, symmetric or with "
                          f"`zero_point: int`")  # fmt: skip
    enc = encode(mod, name)
    kh, kw = g.kernel_size
    rows = g.out_channels

    matrix = dequantize(enc)  # (out, in·kh·kw), the values the codes mean
    codes = enc.codes.reshape(rows, g.in_channels, kh, kw).transpose(0, 2, 3, 1)
    values = matrix.reshape(rows, g.in_channels, kh, kw).permute(0, 2, 3, 1)  # (out, kh, kw, in)
    forms = [(values, codes)]
    if g.transposed:  # stride 1: a plain convolution with the kernel flipped
        forms.append((values.flip(1, 2), codes[:, ::-1, ::-1]))
    forms = [(v.contiguous(), Encoded(enc.bits, np.ascontiguousarray(c.reshape(rows, -1)),
                                      enc.scales, 0, enc.zeros)) for v, c in forms]  # fmt: skip
    bias = mod.bias is not None
    if g.transposed:
        (ph, pw), (oh, ow) = g.padding, g.output_padding
        if oh > ph or ow > pw:
            raise LowbitError(f"{name}: output padding beyond the padding has no LiteRT form "
                              f"here")  # fmt: skip
        conv = nn.ConvTranspose2d(g.in_channels, rows, g.kernel_size, g.stride, 0, 0, 1, bias,
                                  g.dilation)  # fmt: skip
        layer = Cropped(conv, ph, pw, ph - oh, pw - ow) if (ph, pw) != (0, 0) else conv
    else:
        conv = nn.Conv2d(g.in_channels, rows, g.kernel_size, g.stride, g.padding, g.dilation,
                         1, bias)  # fmt: skip
        layer = conv
    conv.weight.data = g.weight(matrix).contiguous()
    if bias:
        conv.bias.data = mod.bias.detach().float()
    return layer, forms


__all__ = ["Cropped", "float_layer", "write_litert_image"]
