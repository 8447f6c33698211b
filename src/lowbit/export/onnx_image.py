"""ONNX export of quantized image models (convolutions) as standard QDQ graphs.

Each :class:`QuantConv` becomes ``DequantizeLinear(codes) -> Conv / ConvTranspose`` in the
standard ONNX domain (opset 21: 4-bit types and blocked scales), and activations the recipe
rounds become ``QuantizeLinear -> DequantizeLinear`` in front of it (static: the calibrated
scale and zero point; dynamic: the tensor's own range, as lowbit computes it). ONNX Runtime
folds each weight's dequantization into a float initializer when it loads the file; the file
keeps 1 byte per code of 5–8 bits and half a byte per code of 4 bits or fewer.

Grids: lowbit's codes are unsigned, ``w = (u - zero) · scale`` per group. Symmetric 8-bit
weights are written as int8 ``u - 128`` with zero point 0 (the form QDQ fusion looks for; ONNX
Runtime 1.32 still ran the DCGAN's transposed convolutions in float: checked); other grids as
uint8 (5–8 bits) or uint4 (≤ 4 bits) codes with their integer zero point (the grid's middle
for symmetric grids); float offsets (``zero_point: float``) as zero point 0 plus the offset
added to the dequantized weight. Per-channel layers dequantize the 4-D weight along its
output-channel axis; grouped layers dequantize the (out, in·kh·kw) matrix in blocks along its
columns, then reshape it.

The graph maps ``input`` (batch first; the model's other input dimensions fixed) to ``output``.
Layers that are not quantized (BatchNorm, folded at quantization, activations, float layers)
export as torch's exporter writes them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec
from lowbit.models import set_module
from lowbit.nn import QuantConv
from lowbit.nn.quant_conv import ConvGeometry
from lowbit.primitives.activations import fake_quantize_dynamic, fake_quantize_static
from lowbit.primitives.qparams import QParams

OPSET = 21
ONNX_FILE = "model.onnx"
UINT4, UINT8, INT8 = 21, 2, 3  # onnx.TensorProto element types
# the op's integer settings, in this order (see QDQConv)
META = ("transposed", "sh", "sw", "ph", "pw", "dh", "dw", "groups", "oph", "opw", "group",
        "uint4", "offsets", "acts", "act_sym")  # fmt: skip


class QDQConv(nn.Module):
    """A QuantConv as dequantize + convolution (export only)."""

    def __init__(self, mod: QuantConv, layer: str) -> None:
        super().__init__()
        spec, geo = mod.spec, mod.geometry
        if (
            spec.qtype.kind != "int"
            or spec.lorc_rank
            or spec.granularity not in ("channel", "group")
        ):
            raise LowbitError(f"{layer}: {spec.short()} has no ONNX QDQ form (integer grids, "
                              "per channel or grouped, without LoRC)")  # fmt: skip
        act = mod.act
        if act is not None and (act.bits != 8 or act.granularity != "tensor"):
            raise LowbitError(f"{layer}: ONNX export takes 8-bit per-tensor activations, not "
                              f"{act.short()}")  # fmt: skip
        u, qp = mod.codes(), mod.qparams()  # (out, cols) unsigned; params (out, G)
        scale = qp.scale.float()
        offset = torch.zeros_like(scale)
        if spec.symmetric:
            zero = torch.full_like(scale, float(spec.qtype.mid))
        elif spec.zero_point == "int":
            zero = qp.zero.float().reshape(scale.shape)
        else:
            zero, offset = torch.zeros_like(scale), qp.zero.float().reshape(scale.shape)
        bits = spec.qtype.bits
        if bits == 8 and spec.symmetric:
            codes, zero = (u.to(torch.int16) - 128).to(torch.int8), zero.sub(128).to(torch.int8)
        else:
            codes, zero = u.to(torch.uint8), zero.to(torch.uint8)
        per_channel = scale.shape[1] == 1
        if not per_channel and u.shape[1] % spec.group_size:
            raise LowbitError(f"{layer}: {u.shape[1]} inputs per output channel are not whole "
                              f"groups of {spec.group_size}")  # fmt: skip
        if per_channel:  # the 4-D weight, one scale per output channel
            codes = geo.weight(codes).contiguous()
            scale, zero, offset = scale.reshape(-1), zero.reshape(-1), offset.reshape(-1)
        for name, t in (("codes", codes), ("scale", scale), ("zero", zero), ("offset", offset)):
            self.register_buffer(name, t.contiguous())
        self.register_buffer("bias", mod.bias.detach().float() if mod.bias is not None
                             else torch.zeros(geo.out_channels))  # fmt: skip
        static = act is not None and not act.dynamic
        if static and mod.act_scale.numel() > 1:
            raise LowbitError(f"{layer}: per-step activation ranges (a diffusion sampler's) "
                              f"have no ONNX form here; quantize with step_groups: 1 to "
                              f"export")  # fmt: skip
        self.register_buffer("act_scale", mod.act_scale.float().reshape(()) if static
                             else torch.ones(()))  # fmt: skip
        act_zero = mod.act_zero if static and mod.act_zero is not None else None
        self.register_buffer("act_zero", act_zero.reshape(()).float() if act_zero is not None
                             else torch.zeros(()))  # fmt: skip
        self.shape = list(geo.weight(torch.empty(geo.shape, device="meta")).shape)
        acts = 0 if act is None else (2 if act.dynamic else 1)
        self.meta = [int(geo.transposed), *geo.stride, *geo.padding, *geo.dilation, geo.groups,
                     *geo.output_padding, 0 if per_channel else spec.group_size,
                     int(bits <= 4), int(not spec.symmetric and spec.zero_point == "float"), acts,
                     int(bool(act is not None and act.symmetric))]  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lowbit_onnx.qdq_conv(x, self.codes, self.scale, self.zero, self.offset,
                                              self.bias, self.act_scale, self.act_zero,
                                              self.shape, self.meta)  # fmt: skip


def _settings(meta: list[int]) -> dict[str, int]:
    return dict(zip(META, meta, strict=True))


def _geometry(shape: list[int], m: dict[str, int]) -> ConvGeometry:
    """The convolution a weight of ``shape`` with these settings describes."""
    out, inner = (shape[1], shape[0]) if m["transposed"] else (shape[0], shape[1])
    return ConvGeometry(bool(m["transposed"]), inner * m["groups"], out, (shape[2], shape[3]),
                        (m["sh"], m["sw"]), (m["ph"], m["pw"]), (m["dh"], m["dw"]), m["groups"],
                        (m["oph"], m["opw"]))  # fmt: skip


def dequantized(codes: Tensor, scale: Tensor, zero: Tensor, offset: Tensor,
                geo: ConvGeometry, group: int) -> Tensor:  # fmt: skip
    """The float conv weight the exported DequantizeLinear nodes compute."""
    if group == 0:  # the 4-D weight, params along its output-channel axis
        view = [1, -1, 1, 1] if geo.transposed else [-1, 1, 1, 1]
        zero, scale, offset = (t.float().reshape(view) for t in (zero, scale, offset))
        return (codes.float() - zero) * scale + offset
    n, cols = codes.shape
    u = codes.float().reshape(n, cols // group, group)
    w = (u - zero.float().unsqueeze(-1)) * scale.unsqueeze(-1) + offset.unsqueeze(-1)
    return geo.weight(w.reshape(n, cols))


def _round_input(x: Tensor, act_scale: Tensor, act_zero: Tensor, m: dict[str, int]) -> Tensor:
    """lowbit's own 8-bit per-tensor rounding (what the QuantizeLinear / DequantizeLinear pair
    computes): the stored range, or for dynamic activations the tensor's own."""
    spec = ActivationSpec(bits=8, granularity="tensor", dynamic=m["acts"] == 2,
                          symmetric=bool(m["act_sym"]))  # fmt: skip
    if spec.dynamic:
        return fake_quantize_dynamic(x, spec)
    zero = None if spec.symmetric else act_zero.reshape(1).to(torch.uint8)
    return fake_quantize_static(x, QParams(act_scale.reshape(1), zero), spec)


@functools.cache
def _register() -> dict:
    """``lowbit_onnx::qdq_conv`` and its ONNX translation (registered on first export)."""

    @torch.library.custom_op("lowbit_onnx::qdq_conv", mutates_args=())
    def qdq_conv(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, offset: Tensor,
                 bias: Tensor, act_scale: Tensor, act_zero: Tensor, shape: list[int],
                 meta: list[int]) -> Tensor:  # fmt: skip
        m = _settings(meta)
        geo = _geometry(shape, m)
        if m["acts"]:
            x = _round_input(x, act_scale, act_zero, m)
        return geo.apply(x, dequantized(codes, scale, zero, offset, geo, m["group"]), bias)

    @qdq_conv.register_fake
    def _(x, codes, scale, zero, offset, bias, act_scale, act_zero, shape, meta):
        geo = _geometry(shape, _settings(meta))
        return geo.apply(x, torch.empty(shape, dtype=x.dtype, device=x.device), bias)

    return {torch.ops.lowbit_onnx.qdq_conv.default: _translation}


def _translation(x, codes, scale, zero, offset, bias, act_scale, act_zero, shape, meta):
    from onnxscript import opset21 as op

    m = _settings(meta)
    if m["uint4"]:  # written packed as uint4 initializers by _pack_uint4 after the export
        codes, zero = op.Cast(codes, to=UINT4), op.Cast(zero, to=UINT4)
    if m["group"] == 0:
        w = op.DequantizeLinear(codes, scale, zero, axis=1 if m["transposed"] else 0)
        if m["offsets"]:
            view = [1, -1, 1, 1] if m["transposed"] else [-1, 1, 1, 1]
            w = op.Add(w, op.Reshape(offset, op.Constant(value_ints=view)))
    else:
        w = op.DequantizeLinear(codes, scale, zero, axis=1, block_size=m["group"])
        if m["offsets"]:
            n, cols = op.Shape(codes, start=0, end=1), op.Shape(codes, start=1, end=2)
            g = op.Constant(value_ints=[m["group"]])
            w3 = op.Reshape(w, op.Concat(n, op.Div(cols, g), g, axis=0))
            w = op.Reshape(op.Add(w3, op.Unsqueeze(offset, op.Constant(value_ints=[-1]))),
                           op.Concat(n, cols, axis=0))  # fmt: skip
        if m["transposed"]:
            inner = [shape[1], shape[0], shape[2], shape[3]]
            w = op.Transpose(op.Reshape(w, op.Constant(value_ints=inner)), perm=[1, 0, 2, 3])
        else:
            w = op.Reshape(w, op.Constant(value_ints=list(shape)))
    if m["acts"]:
        x = _qdq_input(op, x, act_scale, act_zero, m)
    pads = [m["ph"], m["pw"], m["ph"], m["pw"]]
    strides, dil = [m["sh"], m["sw"]], [m["dh"], m["dw"]]
    if m["transposed"]:
        return op.ConvTranspose(x, w, bias, strides=strides, pads=pads, dilations=dil,
                                group=m["groups"], output_padding=[m["oph"], m["opw"]])  # fmt: skip
    return op.Conv(x, w, bias, strides=strides, pads=pads, dilations=dil, group=m["groups"])


def _qdq_input(op, x, act_scale, act_zero, m: dict[str, int]):
    """QuantizeLinear -> DequantizeLinear with the stored range, or the tensor's own."""
    kind = INT8 if m["act_sym"] else UINT8
    if m["acts"] == 2:
        lo = op.Min(op.ReduceMin(x, keepdims=0), op.CastLike(op.Constant(value_float=0.0), x))
        hi = op.Max(op.ReduceMax(x, keepdims=0), op.CastLike(op.Constant(value_float=0.0), x))
        if m["act_sym"]:
            act_scale = op.Div(op.Max(op.Neg(lo), hi), op.Constant(value_float=127.0))
        else:
            act_scale = op.Div(op.Sub(hi, lo), op.Constant(value_float=255.0))
        positive = op.Greater(act_scale, op.Constant(value_float=0.0))
        act_scale = op.Where(positive, act_scale, op.Constant(value_float=1.0))
        if m["act_sym"]:
            act_zero = op.Constant(value_float=0.0)
        else:
            rounded = op.Round(op.Div(op.Neg(lo), act_scale))
            act_zero = op.Clip(rounded, op.Constant(value_float=0.0),
                               op.Constant(value_float=255.0))  # fmt: skip
    zero = op.Cast(act_zero, to=kind)
    return op.DequantizeLinear(op.QuantizeLinear(x, act_scale, zero), act_scale, zero)


def _pack_uint4(path: Path) -> None:
    """Replace each Cast-to-uint4 of an initializer by a uint4 initializer (half a byte per
    code in the file; ONNX packs 4-bit tensors two to a byte)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to == UINT4 and node.input[0] in inits:
            values = numpy_helper.to_array(inits[node.input[0]]).astype(np.uint8)
            flat = np.append(values.reshape(-1), np.uint8(0))[: 2 * ((values.size + 1) // 2)]
            raw = (flat[0::2] | (flat[1::2] << 4)).tobytes()  # first element in the low nibble
            tensor = helper.make_tensor(node.output[0], UINT4, values.shape, raw, raw=True)
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(path))


def _dynamic_dims(x: Tensor) -> dict:
    """The input dimensions the graph leaves free: the batch, and an image's height and width
    (an image-to-image model runs on any size; a generator's (N, latent, 1, 1) input stays
    fixed). ``Dim.AUTO`` lets torch.export keep a side fixed or bounded where the model
    needs it (e.g. unpadded convolutions need a minimum size)."""
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if x.dim() == 4 and min(x.shape[2:]) > 1:
        dims |= {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    return dims


def write_onnx_image(model: nn.Module, example: Tensor, name: str, folder: Path,
                     tmp: Path) -> None:  # fmt: skip
    """Export the quantized image ``model`` (loaded from ``folder`` without kernels; ``example``
    is one batch of its inputs) into ``tmp``."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise LowbitError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'lowbit[export]'"
        ) from None
    table = _register()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv)]
    if not layers:
        raise LowbitError(f"{folder} has no quantized convolutions to export")
    for layer, mod in layers:
        set_module(model, layer, QDQConv(mod, layer))
    x = example[:2].float()
    if len(x) == 1:  # a batch of 1 would be fixed to 1 by torch.export
        x = x.expand(2, *x.shape[1:]).contiguous()
    dims = _dynamic_dims(x)
    with torch.no_grad():
        program = torch.onnx.export(
            model.eval(), (x,), dynamo=True, opset_version=OPSET, input_names=["input"],
            output_names=["output"], dynamic_shapes=(dims,),
            custom_translation_table=table, verbose=False,
        )  # fmt: skip
    program.save(str(tmp / ONNX_FILE))
    _pack_uint4(tmp / ONNX_FILE)
    (tmp / "lowbit.json").write_text(
        (folder / "lowbit.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    shape = ["batch", *(("height", "width")[i - 2] if i in dims else str(x.shape[i])
                        for i in range(1, x.dim()))]  # fmt: skip
    info = {"inputs": {"input": f"float32 ({', '.join(shape)})"},
            "outputs": {"output": "float32"}, "model": name, "producer": "lowbit"}  # fmt: skip
    (tmp / "lowbit_onnx.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
