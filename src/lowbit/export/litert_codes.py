"""lowbit's codes and scales written into a converted LiteRT flatbuffer, exactly.

The converter sees each quantized layer as a float weight (its dequantized values), so every
FULLY_CONNECTED weight in the file is found by its bytes (or, where the converter folded a
multiplier into it, as a multiple of them: :mod:`lowbit.export.litert_unfold`) and replaced by
the layer's own codes:

  int8 symmetric, per channel    INT8, per-channel float32 scales, zero points 0
  int4 symmetric, per channel    INT4 (two codes per byte, element 2k in the low nibble)
  int8 / int4 per channel with   the same types with per-channel zero points, weight-only: a
    integer zero points          DEQUANTIZE op feeds a float FULLY_CONNECTED (LiteRT takes
                                 zero points in no other form)
  int4 symmetric, groups of      INT4 with BlockwiseQuantization: a FLOAT16 scale tensor
    32 / 64 / 128 along K        (out, in/group), no zero points; the scales must be
                                 bfloat16 values (``scale_dtype: bfloat16`` in the recipe):
                                 XNNPACK rounds block scales to bfloat16 when it loads them
                                 (measured: its outputs match bf16-rounded scales to 2e-7)

A float input with such a weight is LiteRT's dynamic FULLY_CONNECTED (int8 activations
quantized on the fly; XNNPACK on CPU). Anything else is refused, naming the layer, unless the
caller asks for a requantization (lossy, logged). ai-edge-quantizer can also write given codes
(its ``dequantized_weight_recovery`` algorithm), but it re-derives scales from the weights and
rounds block scales to bfloat16, so lowbit's float16 scales would not survive; the tensors are
edited here with the flatbuffer helpers ai-edge-litert ships.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export.litert_flat import add_buffer, builtin, opcode
from lowbit.export.litert_unfold import FoldIndex, restore_multiplier
from lowbit.nn import QuantLinear

log = logging.getLogger(__name__)

BLOCKS = (32, 64, 128)
REQUANTIZE = ("int8", "int4-g32", "float")
LOSSLESS_HINT = (
    "layers LiteRT holds exactly: int8 or int4 symmetric per channel, int4 symmetric in groups "
    "of 32/64/128 with bfloat16 scales, per-channel `zero_point: int` (weight-only), no LoRC; "
    "or pass --requantize"
)


@dataclass
class Encoded:
    """One layer as the file stores it: signed codes (out, in), scales (out,) or (out, in/g)."""

    bits: int
    codes: np.ndarray  # int8 values, in [-2**(bits-1), 2**(bits-1) - 1]
    scales: np.ndarray  # float32 per channel, float16 per block
    group: int  # 0: per channel
    zeros: np.ndarray | None = None  # per-channel integer zero points (weight-only), signed

    def same(self, other: Encoded) -> bool:
        """Whether two encodings hold the same codes, scales, blocks and zero points."""
        zeros = (self.zeros is None and other.zeros is None) or (
            self.zeros is not None and other.zeros is not None
            and np.array_equal(self.zeros, other.zeros))  # fmt: skip
        return (self.bits == other.bits and self.group == other.group and zeros
                and np.array_equal(self.codes, other.codes)
                and np.array_equal(self.scales, other.scales))  # fmt: skip

    @property
    def kind(self) -> str:
        tail = "channel" if not self.group else f"g{self.group}"
        return f"int{self.bits}-{tail}" + ("-asym" if self.zeros is not None else "")


def exact_reason(mod: QuantLinear) -> str | None:
    """Why ``mod`` has no exact LiteRT encoding, or None when it has one."""
    spec = mod.spec
    if spec.lorc_rank:
        return "LoRC corrections"
    if spec.qtype.kind != "int" or spec.qtype.bits not in (4, 8):
        return f"{spec.qtype.name} weights"
    if not spec.symmetric:
        if spec.granularity != "channel" or spec.zero_point != "int":
            return (
                "asymmetric codes other than per-channel with integer zero points (LiteRT "
                "takes zero points only per channel, weight-only: `zero_point: int`)"
            )
        if mod.act is not None:
            return "input rounding on asymmetric weights (LiteRT runs those weight-only)"
        return None
    if spec.granularity == "group":
        if spec.qtype.bits != 4 or spec.group_size not in BLOCKS:
            return f"{spec.qtype.bits}-bit groups of {spec.group_size}"
        if mod.in_features % spec.group_size:
            return f"in_features {mod.in_features} not a multiple of {spec.group_size}"
    elif spec.granularity != "channel":
        return f"{spec.granularity} blocks"
    if spec.granularity == "group" and not _bf16_exact(mod.scale.float()):
        return (
            f"{spec.scale_dtype} block scales that bfloat16 does not hold (LiteRT's CPU "
            "runtime computes int4 blocks with bfloat16 scales; quantize with "
            "`scale_dtype: bfloat16`, e.g. preset w4-sym-g32-bf16)"
        )
    if spec.qtype.bits == 8 and int(mod.codes().min()) == 0:
        return "the int8 code -128 (LiteRT's int8 weights are symmetric in [-127, 127])"
    return None


def _bf16_exact(scale: Tensor) -> bool:
    """Whether every scale is a bfloat16 value that float16 (the file's type) also holds."""
    return torch.equal(scale.bfloat16().float(), scale) and torch.equal(scale.half().float(), scale)


def encode(mod: QuantLinear, layer: str) -> Encoded:
    """The exact encoding of ``mod`` or a one-line error naming the layer."""
    reason = exact_reason(mod)
    if reason is not None:
        raise LowbitError(f"{layer}: {reason} have no exact LiteRT form; {LOSSLESS_HINT}")
    spec = mod.spec
    codes = mod.int8_codes().numpy()
    scale = mod.scale.float().reshape(mod.out_features, -1)
    if spec.granularity == "channel":
        zeros = None
        if not spec.symmetric:  # (u - z)·s = ((u - mid) - (z - mid))·s
            z = mod.qparams().zero.reshape(-1).to(torch.int64) - spec.qtype.mid
            zeros = z.numpy()
        return Encoded(spec.qtype.bits, codes, scale[:, 0].numpy().astype(np.float32), 0, zeros)
    return Encoded(4, codes, scale.half().numpy(), spec.group_size)


def requantized(mod: QuantLinear, w: Tensor, how: str) -> Encoded | None:
    """The nearest LiteRT form of ``mod`` (None: keep float, what ``how="float"`` asks for
    every layer the file cannot hold exactly): otherwise an int4 symmetric block layer keeps its
    codes with its scales rounded to bfloat16, and anything else is rounded from its float
    weight ``w`` to ``how``."""
    spec = mod.spec
    if how == "float":
        return None
    if (
        spec.qtype.kind == "int"
        and spec.qtype.bits == 4
        and spec.symmetric
        and spec.granularity == "group"
        and spec.group_size in BLOCKS
        and not spec.lorc_rank
    ):
        scale = mod.scale.float().reshape(mod.out_features, -1).bfloat16().half()
        return Encoded(4, mod.int8_codes().numpy(), scale.numpy(), spec.group_size)
    if how == "int8":
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
        q = torch.round(w / scale).clamp(-127, 127)
        return Encoded(8, q.to(torch.int8).numpy(), scale[:, 0].numpy().astype(np.float32), 0)
    if w.shape[1] % 32:
        raise LowbitError(f"in_features {w.shape[1]} is not a multiple of 32 for int4-g32")
    blocks = w.reshape(w.shape[0], -1, 32)
    # bfloat16 scales (what XNNPACK computes with) that float16 also holds (its normal range)
    scale = (blocks.abs().amax(-1, keepdim=True) / 7).clamp_min(2**-14).bfloat16().float()
    q = torch.round(blocks / scale).clamp(-8, 7).reshape(w.shape)
    return Encoded(4, q.to(torch.int8).numpy(), scale[..., 0].half().numpy(), 32)


def dequantize(enc: Encoded) -> Tensor:
    """The float weight an encoding means."""
    codes = torch.from_numpy(enc.codes.astype(np.float32))
    scales = torch.from_numpy(enc.scales.astype(np.float32))
    if not enc.group:
        zeros = 0 if enc.zeros is None else torch.from_numpy(enc.zeros.astype(np.float32))[:, None]
        return (codes - zeros) * scales[:, None]
    return (codes.reshape(codes.shape[0], -1, enc.group) * scales[..., None]).reshape(codes.shape)


def digest(weight: Tensor | np.ndarray) -> str:
    """The identity of a float32 weight by its bytes (a tensor, or a buffer's raw bytes)."""
    data = weight.detach().float().contiguous().numpy() if isinstance(weight, Tensor) else weight
    return hashlib.blake2b(np.ascontiguousarray(data).view(np.uint8), digest_size=16).hexdigest()


def write_codes(model, encoded: dict[str, tuple[str, Encoded]], weight_only: bool = False,
                biases: dict[str, np.ndarray] | None = None) -> dict[str, str]:  # fmt: skip
    """Replace, in the flatbuffer object ``model`` (``ModelT``), every FULLY_CONNECTED,
    CONV_2D or TRANSPOSE_CONV weight whose float32 bytes have a digest in ``encoded`` (digest ->
    (layer, encoding), the codes in the file's weight layout) by the layer's codes; returns
    layer -> encoding kind. With ``weight_only`` every weight is a DEQUANTIZE op's output (the
    op computes in float32 with exactly these weights), else only those with zero points.
    A FULLY_CONNECTED weight the converter multiplied by the constant after the layer is found
    too and gets that multiplication back as a MUL (:mod:`lowbit.export.litert_unfold`), its
    bias taken from ``biases`` (layer -> float32 bias). Float buffers no longer used are
    emptied."""
    from ai_edge_litert import schema_py_generated as fb

    by_layer = dict(encoded.values())  # the folded search: layers of one form (linears)
    folds = FoldIndex({n: (e.codes.shape, lambda e=e: dequantize(e).numpy())
                       for n, e in by_layer.items()})  # fmt: skip
    written: dict[str, str] = {}
    buffers: dict[tuple[str, str], int] = {}  # (layer, codes | scales | factor | bias) -> index
    replaced: set[int] = set()
    for sg, op, tensor in _weights(model):
        data = model.buffers[tensor.buffer].data
        if tensor.type != fb.TensorType.FLOAT32 or data is None or not len(data):
            continue
        raw = np.asarray(data)
        layer, enc = encoded.get(digest(raw), (None, None))
        if layer is None and builtin(model, op) == fb.BuiltinOperator.FULLY_CONNECTED:
            found = folds.find(raw.view(np.float32).reshape(tensor.shape))
            if found is not None:
                layer, enc = found.layer, by_layer[found.layer]
                replaced.update(_restore(model, sg, op, found, biases or {}, buffers))
        if layer is None:
            continue
        if (layer, "codes") not in buffers:
            buffers[layer, "codes"] = add_buffer(model, _packed(enc))
        replaced.add(tensor.buffer)
        if weight_only or enc.zeros is not None:  # DEQUANTIZE(codes) feeds the float weight
            tensor = _dequantized_input(model, sg, tensor)
        tensor.buffer = buffers[layer, "codes"]
        tensor.type = fb.TensorType.INT8 if enc.bits == 8 else fb.TensorType.INT4
        tensor.quantization = _params(model, sg, tensor, enc, layer, buffers)
        written[layer] = enc.kind
    used = {t.buffer for sg in model.subgraphs for t in sg.tensors}
    for index in replaced - used:
        model.buffers[index].data = None
    missing = sorted(set(by_layer) - set(written))
    if missing:
        raise LowbitError(
            f"{missing[0]}: the converted graph holds this layer in a form the exporter does "
            "not recognise (no FULLY_CONNECTED, CONV_2D or TRANSPOSE_CONV with its weight, or "
            "with that weight times a constant)"
        )
    return written


def _restore(model, sg, op, found, biases: dict[str, np.ndarray], buffers: dict) -> list[int]:
    """Undo a folded multiplier on ``op`` (shared buffers per layer); returns freed buffers."""
    layer = found.layer
    if (layer, "factor") not in buffers:
        buffers[layer, "factor"] = add_buffer(model, found.factor)
        if layer in biases:
            buffers[layer, "bias"] = add_buffer(model, biases[layer].astype(np.float32))
    log.debug("%s: the converter folded a multiplier into it; restored as a MUL", layer)
    return restore_multiplier(model, sg, op, buffers[layer, "factor"], buffers.get((layer, "bias")))


def _packed(enc: Encoded) -> np.ndarray:
    raw = enc.codes.reshape(-1).view(np.uint8)
    if enc.bits == 8:
        return raw.copy()
    from ai_edge_quantizer.transformations.transformation_utils import pack_data

    return pack_data(4, raw)  # two per byte, element 2k in the low nibble


def _params(model, sg, tensor, enc: Encoded, layer: str, buffers: dict):
    from ai_edge_litert import schema_py_generated as fb

    q = fb.QuantizationParametersT()
    q.quantizedDimension = 0
    if not enc.group:
        q.scale = enc.scales.astype(np.float32)
        zeros = np.zeros(len(enc.scales)) if enc.zeros is None else enc.zeros
        q.zeroPoint = zeros.astype(np.int64)
        return q
    if (layer, "scales") not in buffers:
        buffers[layer, "scales"] = add_buffer(model, enc.scales.astype(np.float16))
    scales = fb.TensorT()
    scales.name = tensor.name + b"_scales"
    scales.shape = list(enc.scales.shape)
    scales.type = fb.TensorType.FLOAT16
    scales.buffer = buffers[layer, "scales"]
    sg.tensors.append(scales)
    details = fb.BlockwiseQuantizationT()
    details.scales = len(sg.tensors) - 1
    details.zeroPoints = -1  # none: symmetric
    details.blockSize = enc.group
    q.detailsType = fb.QuantizationDetails.BlockwiseQuantization
    q.details = details
    return q


def read_codes(model) -> dict[bytes, Encoded]:
    """Every quantized weight of a flatbuffer object's FULLY_CONNECTED, CONV_2D and
    TRANSPOSE_CONV ops, by tensor name, decoded back to signed codes (out, rest of the file's
    layout) and scales (the check that the file holds what lowbit wrote)."""
    from ai_edge_litert import schema_py_generated as fb

    out: dict[bytes, Encoded] = {}
    for sg, _, t in _weights(model):
        t = _producer_input(model, sg, t)
        if t.type not in (fb.TensorType.INT8, fb.TensorType.INT4):
            continue
        raw = np.asarray(model.buffers[t.buffer].data, dtype=np.uint8)
        n, k = t.shape[0], int(np.prod(t.shape[1:]))
        if t.type == fb.TensorType.INT8:
            bits, codes = 8, raw.view(np.int8).reshape(n, k)
        else:
            lo, hi = (raw & 0xF).astype(np.int8), (raw >> 4).astype(np.int8)
            codes = np.stack([lo, hi], -1).reshape(-1)[: n * k].reshape(n, k)
            bits, codes = 4, np.where(codes > 7, codes - 16, codes).astype(np.int8)
        q = t.quantization
        if q.detailsType == fb.QuantizationDetails.BlockwiseQuantization:
            st = sg.tensors[q.details.scales]
            scales = np.asarray(model.buffers[st.buffer].data, np.uint8).view(np.float16)
            enc = Encoded(bits, codes, scales.reshape(st.shape), q.details.blockSize)
        else:
            zeros = np.asarray(q.zeroPoint, np.int64)
            enc = Encoded(bits, codes, np.asarray(q.scale, np.float32), 0,
                          zeros if zeros.any() else None)  # fmt: skip
        out[t.name] = enc
    return out


def _dequantized_input(model, sg, weight):
    """Turn the constant float ``weight`` into the output of a new DEQUANTIZE op placed first
    in the subgraph; returns the new (quantized) input tensor of that op."""
    from ai_edge_litert import schema_py_generated as fb

    codes = fb.TensorT()
    codes.name, codes.shape = weight.name + b"_codes", list(weight.shape)
    sg.tensors.append(codes)
    weight.buffer = 0  # now computed: no data
    op = fb.OperatorT()
    op.opcodeIndex = opcode(model, fb.BuiltinOperator.DEQUANTIZE)
    op.inputs, op.outputs = [len(sg.tensors) - 1], [sg.tensors.index(weight)]
    sg.operators.insert(0, op)
    return codes


def _producer_input(model, sg, tensor):
    """The quantized input of the DEQUANTIZE op that computes ``tensor``, else ``tensor``."""
    from ai_edge_litert import schema_py_generated as fb

    index = sg.tensors.index(tensor)
    for op in sg.operators:
        if builtin(model, op) == fb.BuiltinOperator.DEQUANTIZE and list(op.outputs) == [index]:
            return sg.tensors[op.inputs[0]]
    return tensor


def _weights(model):
    """(subgraph, op, weight tensor) of every FULLY_CONNECTED, CONV_2D and TRANSPOSE_CONV op of a
    flatbuffer object (the weight is input 1 of each; a copy of the list: DEQUANTIZE ops may be
    added while it is walked)."""
    from ai_edge_litert import schema_py_generated as fb

    ops = (fb.BuiltinOperator.FULLY_CONNECTED, fb.BuiltinOperator.CONV_2D,
           fb.BuiltinOperator.TRANSPOSE_CONV)  # fmt: skip
    for sg in model.subgraphs:
        for op in list(sg.operators):
            if builtin(model, op) in ops:
                yield sg, op, sg.tensors[op.inputs[1]]
