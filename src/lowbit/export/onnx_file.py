"""ONNX export for ONNX Runtime: weight-only 4/8-bit layers as ``com.microsoft::MatMulNBits``.

torch's exporter (``torch.onnx.export(dynamo=True)``, with onnxscript) traces the model; each
QuantLinear is swapped for a module that calls the custom op ``lowbit_onnx::matmul_nbits``,
whose PyTorch implementation is the dequantize-then-matmul reference and whose ONNX translation
is one MatMulNBits node. lowbit's packed codes are already MatMulNBits' layout (codes packed
low-first along K, one byte row per output), so B is a reshape of the saved tensor; scales and
zero points are per block. MatMulNBits dequantizes (code - zero) * scale: symmetric grids use its
default zero 2**(bits-1), integer zero points pass as given, and float offsets m become the float
zero -m/scale (exact up to float32 rounding).

The graph maps ``input_ids`` (batch, sequence) to ``logits`` (batch, sequence, vocab) with no KV
cache: it is what a perplexity or scoring run needs; generation with a cache is not exported yet.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export.compressed import copy_side_files
from lowbit.kernels.int8 import int8_eligible
from lowbit.models import set_module
from lowbit.models.modules import context_limit
from lowbit.nn import QuantLinear
from lowbit.packing import pack

OPSET = 18
ONNX_FILE = "model.onnx"


@functools.cache
def _register_op() -> dict:
    """Register ``lowbit_onnx::matmul_nbits`` once (on first export, not at import)."""

    @torch.library.custom_op("lowbit_onnx::matmul_nbits", mutates_args=())
    def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, zeros: Tensor, k: int, n: int,
                     bits: int, block: int) -> Tensor:  # fmt: skip
        return F.linear(x, _dequantize(b, scales, zeros, k, bits, block))

    @matmul_nbits.register_fake
    def _(x, b, scales, zeros, k, n, bits, block):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.custom_op("lowbit_onnx::w8a8_linear", mutates_args=())
    def w8a8_linear(x: Tensor, w_t: Tensor, w_scale: Tensor) -> Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0  # (..., 1) per token
        q = torch.round(x / s).clamp(-127, 127)
        return (q @ w_t.float()) * s * w_scale

    @w8a8_linear.register_fake
    def _(x, w_t, w_scale):
        return x.new_empty((*x.shape[:-1], w_t.shape[1]))

    ops = torch.ops.lowbit_onnx
    return {ops.matmul_nbits.default: _translation, ops.w8a8_linear.default: _w8a8_translation}


def _dequantize(b: Tensor, scales: Tensor, zeros: Tensor, k: int, bits: int, block: int) -> Tensor:
    """The float (N, K) weight MatMulNBits computes from B (N, blocks, blob), scales and
    float zeros (N, blocks)."""
    n = b.shape[0]
    zeros = zeros.float().reshape(n, -1)  # float (N, blocks), or uint8 (N*blocks,) for 8 bits
    if bits == 8:
        codes = b.reshape(n, -1).float()
    else:
        lo, hi = (b & 0xF).float(), (b >> 4).float()
        codes = torch.stack([lo, hi], dim=-1).reshape(n, -1)  # (N, blocks*block)
    codes = codes.reshape(n, -1, block)  # (N, blocks, block)
    w = (codes - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.reshape(n, -1)[:, :k]


def _translation(x, b, scales, zeros, k: int, n: int, bits: int, block: int):
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.MatMulNBits(x, b, scales, zeros, K=k, N=n, bits=bits, block_size=block)


def _w8a8_translation(x, w_t, w_scale):
    """Per-token symmetric int8 activations (amax/127 per row), MatMulInteger, float rescale."""
    from onnxscript import opset18 as op

    amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    s = op.Div(op.Max(amax, op.CastLike(op.Constant(value_float=1e-12), x)),
               op.CastLike(op.Constant(value_float=127.0), x))  # fmt: skip
    lim = op.CastLike(op.Constant(value_float=127.0), x)
    q = op.Cast(op.Clip(op.Round(op.Div(x, s)), op.Neg(lim), lim), to=3)  # int8
    acc = op.MatMulInteger(q, w_t)  # int32 (..., N)
    return op.Mul(op.Mul(op.CastLike(acc, x), s), w_scale)


@functools.cache
def _register_schema() -> None:
    """Declare ONNX Runtime's contrib op to the onnx package (which ships only the standard
    ops), so the exporter can build the node; the inputs used here are A, B, scales, zeros
    (float zeros (N, blocks) at 4 bits, uint8 zeros (N*blocks,) at 8 bits)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "float"),
                          ("T2", ["tensor(uint8)"], "packed codes"),
                          ("T3", ["tensor(float)", "tensor(float16)", "tensor(uint8)"], "zeros")],
        attributes=[attr("K", OpSchema.AttrType.INT, "K"), attr("N", OpSchema.AttrType.INT, "N"),
                    attr("bits", OpSchema.AttrType.INT, "bits"),
                    attr("block_size", OpSchema.AttrType.INT, "block size")],
    )  # fmt: skip
    onnx.defs.register_schema(schema)


class NBitsLinear(nn.Module):
    """A QuantLinear in MatMulNBits' layout (export only)."""

    def __init__(self, mod: QuantLinear, layer: str) -> None:
        super().__init__()
        spec, k, n = mod.spec, mod.in_features, mod.out_features
        bits = spec.qtype.bits
        if spec.qtype.kind != "int" or bits not in (4, 8) or mod.act is not None or spec.lorc_rank:
            raise LowbitError(f"{layer}: {spec.short()} has no MatMulNBits twin (ONNX export "
                              "takes int4/int8 weight-only layers)")  # fmt: skip
        group = k if spec.granularity == "channel" else spec.group_size
        if spec.granularity not in ("group", "channel"):
            raise LowbitError(f"{layer}: {spec.granularity} granularity is not exported to ONNX")
        block = _block_size(group, k, layer)
        codes = mod.codes()  # (N, K) unsigned
        scale = mod.scale.float().reshape(n, -1)  # (N, K/group)
        zero = _float_zero(mod, scale)
        if bits == 8 and not spec.symmetric and spec.zero_point != "int":
            raise LowbitError(
                f"{layer}: ONNX Runtime's 8-bit MatMulNBits takes integer zero points only; "
                "use `symmetric: true` or `zero_point: int`"
            )
        reps = group // block  # per-channel rows split into equal blocks sharing one scale
        scale, zero = scale.repeat_interleave(reps, 1), zero.repeat_interleave(reps, 1)
        blob = block * bits // 8
        self.register_buffer("b", pack(codes, bits).reshape(n, k // block, blob).contiguous())
        self.register_buffer("scales", scale.contiguous())
        if bits == 8:  # ORT's CPU kernel wants uint8 zero points at 8 bits, one per block
            zero = zero.round().to(torch.uint8).reshape(-1)
        self.register_buffer("zeros", zero.contiguous())
        self.k, self.n, self.bits, self.block = k, n, bits, block
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.lowbit_onnx.matmul_nbits(x, self.b, self.scales, self.zeros, self.k,
                                               self.n, self.bits, self.block)  # fmt: skip
        return y if self.bias is None else y + self.bias


class W8A8Linear(nn.Module):
    """A W8A8 QuantLinear as int8 MatMulInteger with per-token dynamic activations (export
    only). The exported graph computes symmetric 8-bit activation codes (amax/127 per token), what
    the recipe asks for and lowbit's own CPU runtime computes (:mod:`lowbit.kernels.int8`)."""

    def __init__(self, mod: QuantLinear, layer: str) -> None:
        super().__init__()
        if not int8_eligible(mod.spec, mod.act):
            raise LowbitError(f"{layer}: ONNX export covers W8A8 (int8 symmetric per-channel "
                              f"weights, 8-bit symmetric per-token dynamic inputs), not "
                              f"{mod.spec.short()} with {mod.act.short()}")  # fmt: skip
        self.register_buffer("w_t", mod.int8_codes().t().contiguous())  # (K, N) int8
        self.register_buffer("w_scale", mod.scale.float().reshape(-1).contiguous())  # (N,)
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.lowbit_onnx.w8a8_linear(x, self.w_t, self.w_scale)
        return y if self.bias is None else y + self.bias


def _block_size(group: int, k: int, layer: str) -> int:
    """The MatMulNBits block: the group itself, or for per-channel layers the largest power of
    two >= 16 dividing K (each block repeats the row's scale)."""
    if group == k:
        for block in (128, 64, 32, 16):
            if k % block == 0:
                return block
        raise LowbitError(f"{layer}: in_features {k} is not a multiple of 16 (MatMulNBits)")
    if group < 16 or group & (group - 1):
        raise LowbitError(f"{layer}: group size {group} is not a power of two >= 16, which "
                          "MatMulNBits needs; use e.g. groups of 32, 64 or 128")  # fmt: skip
    return group


def _float_zero(mod: QuantLinear, scale: Tensor) -> Tensor:
    """Zero points in code units, as MatMulNBits' float zeros: x = (u - zero) * scale."""
    spec, n = mod.spec, mod.out_features
    if spec.symmetric:
        return torch.full_like(scale, float(spec.qtype.mid))
    zero = mod.qparams().zero.float().reshape(n, -1)
    if spec.zero_point == "int":
        return zero
    return -zero / scale  # float offset m: u*s + m = (u - (-m/s)) * s


class LogitsOnly(nn.Module):
    """input_ids -> logits, no cache (the exported graph's signature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def prepare(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear for its MatMulNBits twin (in place); returns the export wrapper."""
    _register_op()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise LowbitError("the model has no quantized layers to export")
    for name, mod in layers:
        twin = W8A8Linear if mod.act is not None else NBitsLinear
        set_module(model, name, twin(mod, name))
    return LogitsOnly(model).eval()


def write_onnx(model: nn.Module, folder: Path, tmp: Path) -> None:
    """Export ``model`` (loaded from the lowbit ``folder`` without kernels) into ``tmp``."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise LowbitError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'lowbit[export]'"
        ) from None
    table = _register_op()
    _register_schema()
    wrapper = prepare(model)
    ids = torch.zeros(2, 8, dtype=torch.long)  # not 1: torch.export would fix a size-1 dim
    limit = context_limit(model.config)  # None for ALiBi models (BLOOM, MPT): no bound
    seq = torch.export.Dim("sequence", min=2, **({"max": limit} if limit else {}))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (ids,), dynamo=True, opset_version=OPSET, input_names=["input_ids"],
            output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}},
            custom_translation_table=table, verbose=False,
        )  # fmt: skip
    program.save(str(tmp / ONNX_FILE), external_data=_large(model))
    copy_side_files(folder, tmp)
    (tmp / "config.json").write_text(
        (folder / "config.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    info = {"inputs": {"input_ids": "int64 (batch, sequence)"},
            "outputs": {"logits": "float32 (batch, sequence, vocab)"},
            "kv_cache": False, "producer": "lowbit"}  # fmt: skip
    (tmp / "lowbit_onnx.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def _large(model: nn.Module) -> bool:
    """Weights above protobuf's 2 GB limit go to an external data file."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return total > 1_800_000_000
