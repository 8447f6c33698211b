"""The flatbuffer side of the full-integer LiteRT export (``litert_int8``): one subgraph of a
converted or quantized model, its operators by name, the ranges handed to ai-edge-quantizer
(carried through shape changes and activations, widened where a layer input feeds other
operators too), and the edits made after quantization (lowbit's codes, scales and int32
biases, requantized layer inputs, ReLU / LeakyReLU on int8, the check that nothing but the
output's tail runs in float). ai-edge-quantizer has no API for these edits, hence this module.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.litert_codes import digest
from lowbit.export.litert_flat import add_buffer

LAYER_OPS = ("CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED")
ACTIVATION_OPS = ("RELU", "LEAKY_RELU")
# left in float by the quantizer, made int8 in place: op -> the version of its int8 kernel
# (the output clamp RELU_0_TO_1 has one version, for every type)
INT8_IN_PLACE = {"RELU": 2, "LEAKY_RELU": 2, "RELU_0_TO_1": 1}
SHAPE_OPS = ("TRANSPOSE", "RESHAPE", "SLICE", "STRIDED_SLICE", "PAD", "GATHER_ND")  # same values
# a layer output read by one of these needs no int8 range beyond where the function is flat:
# ReLU and the clamp (0, 1) lose nothing below 0 / outside [0, 1]; tanh and the sigmoid are within
# half an int8 output step of +-1 / 0, 1 beyond |x| = 4 / 8
SATURATES = {"RELU": (0.0, np.inf), "RELU_0_TO_1": (0.0, 1.0), "TANH": (-4.0, 4.0),
             "LOGISTIC": (-8.0, 8.0)}  # fmt: skip
# the output's clamp or squashing, and the range of what it gives
FLOAT_TAIL_OPS = {"RELU_0_TO_1": (0.0, 1.0), "TANH": (-1.0, 1.0), "LOGISTIC": (0.0, 1.0)}


def qsv_range(lo: float, hi: float) -> dict[str, np.ndarray]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # int8 ranges hold zero exactly
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    return {"min": np.full((1, 1, 1, 1), lo, np.float32),
            "max": np.full((1, 1, 1, 1), hi, np.float32)}  # fmt: skip


def exact_range(scale: float, zero: int) -> dict[str, np.ndarray]:
    """The range from which the quantizer derives exactly (scale, zero) for int8."""
    return qsv_range((-128 - zero) * scale, (127 - zero) * scale)


class Int8Graph:
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
            x = self.io(self.op_name(op), op)[0]
            if self.shared(x):
                continue  # see widen()
            qsv[self.tensor_name(x)] = exact_range(*inputs[lname])
        self._spread(qsv, backward=True)
        for op, (lname, _, _) in ops:
            out = self.tensor_name(op.outputs[0])
            if out not in qsv:  # cut where the activation that reads it is flat
                lo, hi = outputs[lname]
                low, high = SATURATES.get(self.reader(op.outputs[0]), (-np.inf, np.inf))
                qsv[out] = qsv_range(max(lo, low), min(hi, high))
        self._spread(qsv, backward=False)
        return qsv

    def widen(self, qsv: dict[str, dict], found: list, inputs: dict) -> dict[str, dict]:
        """A layer input that other operators read too (a residual stream: a convolution and
        the skip connection) keeps its own range, widened to hold the layer's: lowbit rounds
        only the layer's copy to the layer's range, so the file requantizes that copy
        (``requantize``) and the skip connection keeps what the layer's range would clip."""
        qsv = dict(qsv)
        for op, (lname, _, _) in zip(self.layer_ops(), found, strict=True):
            x = self.io(self.op_name(op), op)[0]
            if not self.shared(x):
                continue
            name = self.tensor_name(x)
            exact = exact_range(*inputs[lname])
            have = qsv.get(name, exact)
            lo = min(float(have["min"].min()), float(exact["min"].min()))
            qsv[name] = qsv_range(lo, max(float(have["max"].max()), float(exact["max"].max())))
        return qsv

    def requantize(self, found: list, inputs: dict) -> int:
        """A QUANTIZE (int8 to int8) before each layer whose input tensor holds another range
        than the layer's static one, onto the layer's range; returns how many."""
        ops = self.sg.operators
        quant = next((op.opcodeIndex for op in ops if self.op_name(op) == "QUANTIZE"), None)
        count = 0
        for op, (lname, _, _) in zip(self.layer_ops(), found, strict=True):
            kind = self.op_name(op)
            x = self.io(kind, op)[0]
            X, (scale, zero) = self.tensor(x), inputs[lname]
            q = X.quantization
            if (X.type != self.fb.TensorType.INT8 or q is None
                    or (abs(float(q.scale[0]) - scale) <= 1e-6 * scale
                        and int(q.zeroPoint[0]) == zero)):  # fmt: skip
                continue
            if quant is None:
                raise LowbitError("the quantized graph has no QUANTIZE operator to copy")
            copy = self.fb.TensorT()
            copy.shape, copy.type, copy.buffer = list(X.shape), X.type, 0
            copy.name = X.name + f"_{lname}_input".encode()
            copy.quantization = self.fb.QuantizationParametersT()
            copy.quantization.scale = np.array([scale], np.float32)
            copy.quantization.zeroPoint = np.array([zero], np.int64)
            self.sg.tensors.append(copy)
            requant = self.fb.OperatorT()
            requant.opcodeIndex, requant.inputs = quant, [x]
            requant.outputs = [len(self.sg.tensors) - 1]
            ops.insert(ops.index(op), requant)
            op.inputs[2 if kind == "TRANSPOSE_CONV" else 0] = len(self.sg.tensors) - 1
            count += 1
        if count:
            code = self.model.operatorCodes[quant]
            code.version = max(code.version, 2)  # int8 to int8
        return count

    def _spread(self, qsv: dict[str, dict], backward: bool) -> None:
        """Copy ranges across shape changes (backward: output to input; forward: input to
        output; an activation's output gets the range it maps its input's range to, a
        squashing function's output its own range) until nothing changes."""
        while True:
            before = len(qsv)
            for op in self.sg.operators:
                kind = self.op_name(op)
                a, b = self.tensor_name(op.inputs[0]), self.tensor_name(op.outputs[0])
                if backward:
                    if kind in SHAPE_OPS and b in qsv and a not in qsv:
                        qsv[a] = qsv[b]
                elif kind in SHAPE_OPS and a in qsv and b not in qsv:
                    qsv[b] = qsv[a]
                elif kind in ACTIVATION_OPS and a in qsv and b not in qsv:
                    lo, hi = float(qsv[a]["min"].min()), float(qsv[a]["max"].max())
                    slope = op.builtinOptions.alpha if kind == "LEAKY_RELU" else 0.0
                    qsv[b] = qsv_range(slope * lo if lo < 0 else lo, hi)  # what it gives
                elif kind in FLOAT_TAIL_OPS and b not in qsv:
                    qsv[b] = qsv_range(*FLOAT_TAIL_OPS[kind])
            if len(qsv) == before:
                return

    def unranged(self, qsv: dict[str, dict]) -> list[str]:
        """The names of the tensors that carry values between operators (not constants, not
        the float input and output) and have no range in ``qsv``."""
        ends = {*self.sg.inputs, *self.sg.outputs}
        names = []
        for op in self.sg.operators:
            for t in (*op.inputs, *op.outputs):
                if t < 0 or t in ends or self.tensor(t).type != self.fb.TensorType.FLOAT32:
                    continue
                data = self.model.buffers[self.tensor(t).buffer].data
                name = self.tensor_name(t)
                if (data is None or not len(data)) and name not in qsv and name not in names:
                    names.append(name)
        return names

    def tensor(self, index: int):
        return self.sg.tensors[index]

    def shared(self, tensor: int) -> bool:
        """Whether more than one operator reads ``tensor``."""
        return sum(tensor in o.inputs for o in self.sg.operators) > 1

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
            W.buffer = add_buffer(self.model, codes.astype(np.int8))
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
                B.buffer = add_buffer(self.model, ints.astype(np.int32))
                B.type = self.fb.TensorType.INT32
                B.quantization = self._params(bias_scale)
            written[lname] = "int8-channel-a8"
        used = {t.buffer for t in self.sg.tensors}
        for index in replaced - used - {0}:  # the quantizer's codes, now unused
            self.model.buffers[index].data = None
        return written

    def integer_activations(self) -> None:
        """ReLU, LeakyReLU and the output clamp between a DEQUANTIZE and a QUANTIZE read and
        write int8 instead."""
        ops = self.sg.operators
        for op in list(ops):
            kind = self.op_name(op)
            if kind not in INT8_IN_PLACE:
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
            self.model.operatorCodes[op.opcodeIndex].version = INT8_IN_PLACE[kind]

    def check_integer(self) -> None:
        """Every operator reads and writes integers but the first QUANTIZE and the float tail
        (from a DEQUANTIZE after the last layer, the clamp or squashing and shape changes): one
        that the quantizer left in float (between a DEQUANTIZE and a QUANTIZE) is refused."""
        skip = {id(op) for op in self.sg.operators if set(op.inputs) & set(self.sg.inputs)}
        producer = {t: op for op in self.sg.operators for t in op.outputs}
        todo = list(self.sg.outputs)
        while todo:  # back from the outputs through the float tail
            op = producer.get(todo.pop())
            kind = None if op is None else self.op_name(op)
            tail = kind in (*FLOAT_TAIL_OPS, *SHAPE_OPS, "QUANTIZE", "DEQUANTIZE")
            if tail and id(op) not in skip:
                skip.add(id(op))
                todo.append(op.inputs[0])
        ends = {*self.sg.inputs, *self.sg.outputs}
        bad = []
        for op in self.sg.operators:
            kind = self.op_name(op)
            tensors = [t for t in (*op.inputs, *op.outputs) if t >= 0 and t not in ends]
            floats = any(self.tensor(t).type == self.fb.TensorType.FLOAT32 for t in tensors)
            if id(op) not in skip and (kind == "DEQUANTIZE" or floats):
                bad.append((kind in ("QUANTIZE", "DEQUANTIZE"), kind, op))
        if bad:  # name the float operator, not the DEQUANTIZE before it
            _, kind, op = min(bad, key=lambda b: b[0])
            raise LowbitError(f"{kind} ({self.tensor_name(op.outputs[0])}): ai-edge-quantizer "
                              f"leaves this operator in float, so the model has no full-integer "
                              f"LiteRT form; quantize it with a weight-only recipe (w8-rtn) and "
                              f"export that folder")  # fmt: skip

    def _params(self, scales: np.ndarray):
        q = self.fb.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = scales, np.zeros(len(scales), np.int64), 0
        return q
