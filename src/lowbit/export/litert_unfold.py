"""A quantized layer whose output the model multiplies by a constant, found again in a converted
LiteRT graph and given that multiplication back.

LiteRT's converter folds a constant multiplier that follows a FULLY_CONNECTED into the layer's
weight and bias (OPT's query scaling ``q_proj(x) * head_dim**-0.5``, Granite's
``residual_multiplier`` after ``o_proj`` and ``down_proj``): the file's weight is then c·W,
which is not on the layer's grid, so its codes cannot be written there as they are. The
converter's switch for this fold (``disable_fuse_mul_and_fc``) exists only on its
TensorFlow-based path, which lowbit does not install, so the fold is undone here: a weight is
recognised as a per-row multiple of a layer's dequantized weight (bit for bit, the product
rounded to float32 as the converter rounds it), the layer's codes and own bias are written,
and a MUL by the multiplier follows: the graph lowbit computes, op for op.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lowbit.export.litert_flat import opcode


@dataclass
class Unfolded:
    """A layer found under a folded multiplier: ``factor`` (out,) float32 multiplies its rows."""

    layer: str
    factor: np.ndarray


class FoldIndex:
    """Layers by the sign pattern of their dequantized weight, which a positive per-row
    multiplier keeps (only layers of a shape some unknown weight has are computed, once)."""

    def __init__(self, layers: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]):
        self._layers = layers  # layer -> (shape, its dequantized float32 weight on demand)
        self._by_shape: dict[tuple[int, ...], dict[str, list[str]]] = {}

    def find(self, weight: np.ndarray) -> Unfolded | None:
        """The layer whose weight times a positive float32 per-row factor is ``weight``."""
        keys = self._keys(weight.shape)
        for layer in keys.get(_signs(weight), []):
            factor = row_factor(weight, self._layers[layer][1]())
            if factor is not None:
                return Unfolded(layer, factor)
        return None

    def _keys(self, shape: tuple[int, ...]) -> dict[str, list[str]]:
        if shape not in self._by_shape:
            keys: dict[str, list[str]] = {}
            for layer, (size, weight) in self._layers.items():
                if size == shape:
                    keys.setdefault(_signs(weight()), []).append(layer)
            self._by_shape[shape] = keys
        return self._by_shape[shape]


def row_factor(folded: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """The positive float32 factors c (out,) with float32(weight·c[:, None]) == folded
    exactly, or None. Each row's factor is read off its largest element and confirmed over
    the whole row (the quotient may sit one float32 step from the converter's factor, so both
    neighbours are tried); a row of zeros takes the factor most rows share."""
    if folded.shape != weight.shape or folded.ndim != 2:
        return None
    rows = np.arange(weight.shape[0])
    at = np.abs(weight).argmax(1)
    top = weight[rows, at].astype(np.float64)
    live = top != 0
    if not live.any():
        return None
    quotient = np.ones(len(rows), np.float32)
    quotient[live] = (folded[rows, at][live] / top[live]).astype(np.float32)
    factor = np.full(len(rows), np.nan, np.float32)
    for candidate in (quotient, np.nextafter(quotient, np.float32(np.inf)),
                      np.nextafter(quotient, np.float32(-np.inf))):  # fmt: skip
        same = ((weight * candidate[:, None]) == folded).all(1) & np.isnan(factor) & live
        factor[same] = candidate[same]
    if np.isnan(factor[live]).any() or (factor[live] <= 0).any():
        return None
    if not (folded[~live] == 0).all():
        return None
    values, counts = np.unique(factor[live], return_counts=True)
    factor[~live] = values[counts.argmax()]
    return factor


def restore_multiplier(model, sg, op, factor: int, bias: int | None) -> list[int]:
    """Give the FULLY_CONNECTED ``op`` of subgraph ``sg`` its multiplier back: it writes a new
    tensor, a MUL by the buffer ``factor`` (taking over the op's fused activation) writes its
    old output, and its bias reads the buffer ``bias`` (the layer's own; None: a layer
    without). Returns the buffers it no longer reads."""
    from ai_edge_litert import schema_py_generated as fb

    out = sg.tensors[op.outputs[0]]
    raw = fb.TensorT()
    raw.name, raw.type = out.name + b"_unscaled", fb.TensorType.FLOAT32
    raw.shape, raw.shapeSignature = out.shape, out.shapeSignature
    const = fb.TensorT()
    const.name, const.type, const.buffer = out.name + b"_multiplier", fb.TensorType.FLOAT32, factor
    const.shape = [len(model.buffers[factor].data) // 4]
    sg.tensors += [raw, const]
    mul = fb.OperatorT()
    mul.opcodeIndex = opcode(model, fb.BuiltinOperator.MUL)
    mul.inputs, mul.outputs = [len(sg.tensors) - 2, len(sg.tensors) - 1], [op.outputs[0]]
    mul.builtinOptionsType = fb.BuiltinOptions.MulOptions
    mul.builtinOptions = fb.MulOptionsT()
    options = op.builtinOptions
    mul.builtinOptions.fusedActivationFunction = options.fusedActivationFunction
    options.fusedActivationFunction = fb.ActivationFunctionType.NONE
    op.outputs = [len(sg.tensors) - 2]
    sg.operators.insert(sg.operators.index(op) + 1, mul)
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return []
    held = sg.tensors[op.inputs[2]]
    freed = [held.buffer]
    if bias is None:  # the converter made a bias of the multiplier's shift alone: none here
        op.inputs = [*op.inputs[:2], -1, *op.inputs[3:]]
    else:
        held.buffer = bias
    return freed


def _signs(weight: np.ndarray) -> str:
    """The weight's pattern of positive, negative and zero entries."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.packbits(weight > 0).tobytes())
    h.update(np.packbits(weight < 0).tobytes())
    return h.hexdigest()
