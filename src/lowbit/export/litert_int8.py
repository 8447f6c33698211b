"""Full-integer LiteRT export of a W8A8 image model: int8 activations between the layers.

A model whose every quantized layer takes static 8-bit per-tensor inputs and int8 symmetric
per-output-channel weights (``conv-w8a8-static`` / ``-gptq`` / ``-best``) becomes a ``.tflite``
whose convolutions run on int8 tensors (CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED with int8
inputs, int8 weights and int32 biases), the edge runtime's full-integer form. The numbers are
lowbit's, not a converter's:

- each layer's input scale and zero point are its calibrated static range (a uint8 zero point z
  is the int8 zero point z - 128: the same codes, shifted);
- its weight codes and per-channel scales are the folder's (a code of -128, which GPTQ can
  reach, becomes -127: the file's int8 weights are symmetric; the count is logged), its bias
  the int32 ``round(b / (s_in * s_w[c]))`` that the runtime adds to the integer sums;
- a layer's *output* is rounded to int8 too (LiteRT has no convolution with a fused LeakyReLU
  and a float output in this form): its range comes from that output's values over the model's
  calibration inputs (min-max), measured on the quantized model, cut where the activation that
  reads it is flat (ReLU below 0, a clamp outside [0, 1], tanh beyond +-4). This is one
  rounding more per layer than lowbit's own arithmetic, so the file's outputs are close to the
  folder's, not equal (the export logs the PSNR between them on the example input).

How: litert-torch converts the model with float weights that equal the codes' values;
ai-edge-quantizer's static int8 recipe is handed lowbit's ranges as its calibration result
(its own min-max pass is not run); the codes, scales and biases are then written into the
flatbuffer, and ReLU / LeakyReLU between two int8 tensors run on int8 (the quantizer leaves
them in float between a DEQUANTIZE and a QUANTIZE). The file takes and returns float32 (a
QUANTIZE op first, a DEQUANTIZE last). Operators other than the layers, their activations and
shape changes (residual adds, sigmoid gates, pooling) are refused: export such a model
weight-only.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export.litert_codes import _add_buffer, digest, exact_reason
from lowbit.export.litert_image import INFO_KEY, float_layer
from lowbit.models import set_module
from lowbit.nn import QuantLinear
from lowbit.nn.quant_conv import QuantConv
from lowbit.packing import pack

log = logging.getLogger(__name__)

LAYER_OPS = ("CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED")
ACTIVATION_OPS = ("RELU", "LEAKY_RELU")  # made int8 in place
SHAPE_OPS = ("TRANSPOSE", "RESHAPE", "SLICE", "STRIDED_SLICE", "PAD", "GATHER_ND")  # same values
# a layer output read by one of these needs no int8 range beyond where the function is flat:
# ReLU and the clamp (0, 1) lose nothing below 0 / outside [0, 1]; tanh and the sigmoid are within
# half an int8 output step of +-1 / 0, 1 beyond |x| = 4 / 8
SATURATES = {"RELU": (0.0, np.inf), "RELU_0_TO_1": (0.0, 1.0), "TANH": (-4.0, 4.0),
             "LOGISTIC": (-8.0, 8.0)}  # fmt: skip
# the output's clamp or squashing, and the range of what it gives
FLOAT_TAIL_OPS = {"RELU_0_TO_1": (0.0, 1.0), "TANH": (-1.0, 1.0), "LOGISTIC": (0.0, 1.0)}


def full_int_reason(mod: QuantLinear) -> str | None:
    """Why ``mod`` has no full-integer LiteRT form, or None."""
    act = mod.act
    if act is None or not act.static or act.bits != 8 or act.granularity != "tensor":
        return "inputs not rounded to static 8-bit per-tensor ranges"
    if act.step_groups != 1:
        return "several ranges per layer (step_groups)"
    spec = mod.spec
    if spec.qtype.bits != 8 or not spec.symmetric or spec.granularity != "channel":
        return "weights other than int8 symmetric per output channel"
    if isinstance(mod, QuantConv) and mod.geometry.groups != 1:
        return "a grouped convolution"
    return exact_reason(mod)


def write_litert_int8(model: nn.Module, example: Tensor, calibration: Tensor, name: str,
                      out: Path) -> dict[str, str]:  # fmt: skip
    """Convert the W8A8 image ``model`` (loaded without kernels) at the shape of ``example``
    (one input, batch 1) into the full-integer file ``out``; ``calibration``: the inputs the
    layers' output ranges are measured on. Returns layer -> encoding."""
    try:
        import litert_torch
        from ai_edge_litert import schema_py_generated as fb
        from ai_edge_litert.tools import flatbuffer_utils
        from ai_edge_quantizer import qtyping, quantizer, recipe
    except ImportError:
        raise LowbitError("LiteRT export needs litert-torch, ai-edge-litert and "
                          "ai-edge-quantizer: pip install 'lowbit[litert]'") from None  # fmt: skip
    with torch.no_grad():
        reference = model(example.float())  # the folder's output (before any code is moved)
    layers = _check_layers(model)
    inputs = {n: _input_range(m) for n, m in layers.items()}
    outputs = _output_ranges(model, layers, calibration)
    weights = {}  # digest of the float weight in the file's layout -> (layer, codes, scales)
    for lname, mod in layers.items():
        layer, forms = float_layer(lname, mod)
        set_module(model, lname, layer)
        for values, enc in forms:
            key = digest(values)
            if key in weights and weights[key][0] != lname:
                raise LowbitError(f"{lname} and {weights[key][0]} hold identical weights; the "
                                  f"export tells layers apart by their weights")  # fmt: skip
            weights[key] = (lname, enc, layer)
    from lowbit.export.litert_file import add_metadata, quiet_litert_torch

    quiet_litert_torch()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        raw = Path(work) / "float.tflite"
        litert_torch.convert(model.eval(), (example.float(),)).export(str(raw))
        graph = _Graph(flatbuffer_utils.read_model(str(raw)), fb)
        graph.check_ops()
        found = graph.layers(weights)
        qsv = graph.ranges(found, inputs, outputs)
        qz = quantizer.Quantizer(str(raw), recipe.static_wi8_ai8())
        for op in ("INPUT", "OUTPUT"):  # float32 in and out
            qz.update_quantization_recipe(".*", qtyping.TFLOperationName[op],
                                          algorithm_key="no_quantize")  # fmt: skip
        try:
            result = qz.quantize(qsv, enable_progress_report=False)
        except Exception as exc:  # the quantizer's own errors name tensors, not layers
            raise LowbitError(f"ai-edge-quantizer could not quantize {name} with lowbit's "
                              f"ranges: {str(exc).splitlines()[0]}") from None  # fmt: skip
        flat = _Graph(flatbuffer_utils.read_model_from_bytearray(result.quantized_model), fb)
        written = flat.write_layers(found, inputs)
        flat.integer_activations()
        info = {"producer": "lowbit", "model": name, "input": list(example.shape),
                "layers": written, "integer": True}  # fmt: skip
        add_metadata(flat.model, fb, INFO_KEY, json.dumps(info).encode())
        flatbuffer_utils.write_model(flat.model, str(out))
    _log_agreement(out, example, reference)
    return written


def _check_layers(model: nn.Module) -> dict[str, QuantLinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LowbitError("the model has no quantized layers to export")
    for lname, mod in layers.items():
        _narrow(lname, mod)
        reason = full_int_reason(mod)
        if reason is not None:
            raise LowbitError(f"{lname}: {reason} has no full-integer LiteRT form; quantize "
                              f"with conv-w8a8-static (or -gptq, -best), or with a weight-only "
                              f"recipe (w8-rtn) for a weight-only file")  # fmt: skip
    return layers


def _narrow(lname: str, mod: QuantLinear) -> None:
    """Move int8 codes of -128 to -127: LiteRT's int8 weights are symmetric in [-127, 127], and
    GPTQ's error feedback can push a weight past -127 steps (RTN never does). Each moved weight
    changes by one step; the count is logged."""
    if mod.spec.qtype.kind != "int" or mod.spec.qtype.bits != 8 or not mod.spec.symmetric:
        return
    codes = mod.codes()  # uint8, -128 is code 0
    moved = int((codes == 0).sum())
    if moved:
        mod.qweight.copy_(pack(codes.clamp_min(1), 8))
        log.warning("%s: %d of %d int8 codes moved from -128 to -127 (LiteRT's int8 weights "
                    "are symmetric in [-127, 127])", lname, moved, codes.numel())  # fmt: skip


def _input_range(mod: QuantLinear) -> tuple[float, int]:
    """(scale, int8 zero point) of the layer's static input range."""
    scale = float(mod.act_scale[0])
    zero = 0 if mod.act_zero is None else int(mod.act_zero[0]) - 128  # uint8 codes, shifted
    return scale, zero


@torch.no_grad()
def _output_ranges(model: nn.Module, layers: dict[str, QuantLinear], calibration: Tensor,
                   batch: int = 8) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Min and max of each layer's output over ``calibration`` (the quantized model's), widened
    to hold zero. (Choosing the low end before a LeakyReLU by the squared error after it was
    tried on waifu2x: PSNR fell by 0.3-1.0 dB on the evaluation image; clipping generalises
    badly here, as the percentile observer does.)"""
    seen: dict[str, tuple[float, float]] = {}

    def hook(lname: str):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            lo, hi = min(float(out.min()), 0.0), max(float(out.max()), 0.0)
            old = seen.get(lname, (lo, hi))
            seen[lname] = (min(lo, old[0]), max(hi, old[1]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for part in calibration.float().split(batch):
            model(part)
    finally:
        for h in handles:
            h.remove()
    return seen


def _qsv(lo: float, hi: float) -> dict[str, np.ndarray]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # int8 ranges hold zero exactly
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    return {"min": np.full((1, 1, 1, 1), lo, np.float32),
            "max": np.full((1, 1, 1, 1), hi, np.float32)}  # fmt: skip


def _exact_qsv(scale: float, zero: int) -> dict[str, np.ndarray]:
    """The range from which the quantizer derives exactly (scale, zero) for int8."""
    return _qsv((-128 - zero) * scale, (127 - zero) * scale)


class _Graph:
    """One subgraph of a flatbuffer object (``ModelT``) and the edits made to it."""

    def __init__(self, model, fb) -> None:
        self.model, self.fb = model, fb
        if len(model.subgraphs) != 1:
            raise LowbitError("the converted model has more than one subgraph")
        self.sg = model.subgraphs[0]
        self.names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}

    def op_name(self, op) -> str:
        from ai_edge_litert.tools.flatbuffer_utils import get_builtin_code_from_operator_code

        code = self.model.operatorCodes[op.opcodeIndex]
        return self.names[get_builtin_code_from_operator_code(code)]

    def tensor_name(self, index: int) -> str:
        return self.sg.tensors[index].name.decode()

    @staticmethod
    def io(op_name: str, op) -> tuple[int, int, int]:
        """(input, weight, bias) tensor indices of a layer op."""
        if op_name == "TRANSPOSE_CONV":
            return op.inputs[2], op.inputs[1], op.inputs[3] if len(op.inputs) > 3 else -1
        return op.inputs[0], op.inputs[1], op.inputs[2] if len(op.inputs) > 2 else -1

    def layer_ops(self) -> list:
        return [op for op in self.sg.operators if self.op_name(op) in LAYER_OPS]

    def layers(self, weights: dict) -> list[tuple[str, object, nn.Module]]:
        """(layer, encoding, float layer) of every layer op, in the graph's order (the
        quantizer keeps that order; it may rename weights), found by the float weight."""
        found = []
        for op in self.layer_ops():
            kind = self.op_name(op)
            _, w, _ = self.io(kind, op)
            data = self.model.buffers[self.sg.tensors[w].buffer].data
            key = None if data is None or not len(data) else digest(np.asarray(data))
            if key not in weights:
                raise LowbitError(f"{kind} on {self.tensor_name(w)}: its weight is none of the "
                                  f"model's quantized layers")  # fmt: skip
            found.append(weights[key])
        missing = {n for n, _, _ in weights.values()} - {n for n, _, _ in found}
        if missing:
            raise LowbitError(f"{sorted(missing)[0]}: not found in the converted graph")
        return found

    def reader(self, tensor: int) -> str | None:
        """The first operator other than a shape change that reads ``tensor`` (through shape
        changes that each have one reader), or None where it has several readers."""
        while True:
            readers = [op for op in self.sg.operators if tensor in op.inputs]
            if len(readers) != 1:
                return None
            kind = self.op_name(readers[0])
            if kind not in SHAPE_OPS:
                return kind
            tensor = readers[0].outputs[0]

    def ranges(self, found: list, inputs: dict, outputs: dict) -> dict[str, dict]:
        """The quantizer's calibration result: every layer's input range, carried back through
        shape changes; then each layer output's own range where no such input range reaches it;
        then carried forward through shape changes and activations."""
        qsv: dict[str, dict] = {}
        ops = list(zip(self.layer_ops(), found, strict=True))
        for op, (lname, _, _) in ops:
            qsv[self.tensor_name(self.io(self.op_name(op), op)[0])] = _exact_qsv(*inputs[lname])
        self._spread(qsv, backward=True)
        for op, (lname, _, _) in ops:
            out = self.tensor_name(op.outputs[0])
            if out not in qsv:  # cut where the activation that reads it is flat
                lo, hi = outputs[lname]
                low, high = SATURATES.get(self.reader(op.outputs[0]), (-np.inf, np.inf))
                qsv[out] = _qsv(max(lo, low), min(hi, high))
        self._spread(qsv, backward=False)
        return qsv

    def _spread(self, qsv: dict[str, dict], backward: bool) -> None:
        """Copy ranges across shape changes (backward: output to input; forward: input to
        output, also across activations, and a squashing function's output range) until
        nothing changes."""
        while True:
            before = len(qsv)
            for op in self.sg.operators:
                kind = self.op_name(op)
                a, b = self.tensor_name(op.inputs[0]), self.tensor_name(op.outputs[0])
                if backward:
                    if kind in SHAPE_OPS and b in qsv and a not in qsv:
                        qsv[a] = qsv[b]
                elif (kind in SHAPE_OPS or kind in ACTIVATION_OPS) and a in qsv and b not in qsv:
                    qsv[b] = qsv[a]
                elif kind in FLOAT_TAIL_OPS and b not in qsv:
                    qsv[b] = _qsv(*FLOAT_TAIL_OPS[kind])
            if len(qsv) == before:
                return

    def write_layers(self, found: list, inputs: dict) -> dict[str, str]:
        """lowbit's codes, scales and int32 biases in place of the quantizer's (the layer ops
        in the float graph's order)."""
        written, replaced = {}, set()
        ops = self.layer_ops()
        if len(ops) != len(found):
            raise LowbitError("the quantized graph has other layer operators than the float one")
        for op, (lname, enc, layer) in zip(ops, found, strict=True):
            x, w, b = self.io(self.op_name(op), op)
            replaced |= {self.sg.tensors[i].buffer for i in (w, b) if i >= 0}
            X, W = self.sg.tensors[x], self.sg.tensors[w]
            s_in, z_in = inputs[lname]
            q = X.quantization
            if (q is None or X.type != self.fb.TensorType.INT8 or W.shape[0] != len(enc.scales)
                    or abs(float(q.scale[0]) - s_in) > 1e-6 * s_in
                    or int(q.zeroPoint[0]) != z_in):  # fmt: skip
                raise LowbitError(f"{lname}: the quantized graph's input range is not lowbit's")
            codes = enc.codes.reshape(list(W.shape))
            # a channel of zero codes is zero at any scale: 1 keeps its bias in int32
            scales = np.where((codes.reshape(len(codes), -1) == 0).all(1), np.float32(1),
                              enc.scales.astype(np.float32))  # fmt: skip
            W.buffer = _add_buffer(self.model, codes.astype(np.int8))
            W.type = self.fb.TensorType.INT8
            W.quantization = self._params(scales)
            if b >= 0:
                bias = getattr(layer, "conv", layer).bias
                # the scale the file's input holds (the runtime checks the bias against it)
                bias_scale = (np.float32(q.scale[0]) * scales).astype(np.float32)
                values = (np.zeros(len(scales)) if bias is None
                          else bias.detach().double().numpy())  # fmt: skip
                ints = np.round(values / bias_scale)
                if np.abs(ints).max(initial=0) > np.iinfo(np.int32).max:
                    raise LowbitError(f"{lname}: a bias does not fit int32 at its input and "
                                      f"weight scales; quantize with a weight-only recipe (w8-rtn) "
                                      f"and export that folder")  # fmt: skip
                B = self.sg.tensors[b]
                B.buffer = _add_buffer(self.model, ints.astype(np.int32))
                B.type = self.fb.TensorType.INT32
                B.quantization = self._params(bias_scale)
            written[lname] = "int8-channel-a8"
        used = {t.buffer for t in self.sg.tensors}
        for index in replaced - used - {0}:  # the quantizer's codes, now unused
            self.model.buffers[index].data = None
        return written

    def integer_activations(self) -> None:
        """ReLU / LeakyReLU between a DEQUANTIZE and a QUANTIZE read and write int8 instead."""
        ops = self.sg.operators
        for op in list(ops):
            if self.op_name(op) not in ACTIVATION_OPS:
                continue
            deq = [o for o in ops if list(o.outputs) == [op.inputs[0]]]
            readers = [o for o in ops if op.outputs[0] in o.inputs]
            if (len(deq) != 1 or self.op_name(deq[0]) != "DEQUANTIZE" or len(readers) != 1
                    or self.op_name(readers[0]) != "QUANTIZE"
                    or sum(op.inputs[0] in o.inputs for o in ops) != 1):  # fmt: skip
                continue
            op.inputs, op.outputs = [deq[0].inputs[0]], [readers[0].outputs[0]]
            ops.remove(deq[0])
            ops.remove(readers[0])
            self.model.operatorCodes[op.opcodeIndex].version = 2  # the int8 kernel

    def check_ops(self) -> None:
        allowed = {*LAYER_OPS, *ACTIVATION_OPS, *SHAPE_OPS, *FLOAT_TAIL_OPS, "QUANTIZE",
                   "DEQUANTIZE"}  # fmt: skip
        for op in self.sg.operators:
            if self.op_name(op) not in allowed:
                raise LowbitError(f"{self.op_name(op)}: the full-integer LiteRT export takes "
                                  f"chains of convolutions, ReLU / LeakyReLU and shape changes; "
                                  f"quantize this model with a weight-only recipe (w8-rtn) and "
                                  f"export that folder")  # fmt: skip

    def _params(self, scales: np.ndarray):
        q = self.fb.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = scales, np.zeros(len(scales), np.int64), 0
        return q


def _log_agreement(path: Path, example: Tensor, reference: Tensor) -> None:
    from lowbit.models.litert_image import LiteRTImageModel, image_info

    out = LiteRTImageModel(path, image_info(path))(example.float())
    mse = float((out - reference).double().pow(2).mean())
    peak = float(reference.abs().max())
    db = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
    log.info("the full-integer file's output on the example input is %.2f dB PSNR from the "
             "folder's (one more int8 rounding per layer output)", db)  # fmt: skip


__all__ = ["full_int_reason", "write_litert_int8"]
